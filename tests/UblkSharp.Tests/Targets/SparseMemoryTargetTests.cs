using UblkSharp.Interop;
using UblkSharp.Samples;
using UblkSharp.Targets;

namespace UblkSharp.Tests.Targets;

/// <summary>The documented sample target (samples/UblkSharp.Samples) does what its comment says.</summary>
public class SparseMemoryTargetTests
{
    private const int Block = SparseMemoryTarget.BlockSize;

    [Fact]
    public void IsAWritableDiscardingDiskWithoutACache()
    {
        using var t = new SparseMemoryTarget(1L << 40);
        Assert.Equal(1L << 40, t.Size);
        Assert.Equal("sparse-mem", t.Kind);
        Assert.Equal("1099511627776", t.Recipe["size"]);
        Assert.False(t.IsReadOnly);
        Assert.True(t.CanDiscard);
        Assert.True(t.CanWriteZeroes);
        Assert.False(t.HasVolatileCache);
        Assert.Null(t.CreateUringBackend(0));
        Assert.Equal(0, t.AllocatedBytes);
    }

    [Theory]
    [InlineData(0L)]
    [InlineData(-4096L)]
    [InlineData(512L)]
    [InlineData(4097L)]
    public void RejectsSizesThatAreNotPositiveMultiplesOfABlock(long size)
    {
        var e = Assert.Throws<ArgumentOutOfRangeException>(() => new SparseMemoryTarget(size));
        Assert.Equal("size", e.ParamName);
        Assert.StartsWith("The size must be a positive multiple of 4096 bytes", e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void UnwrittenBlocksReadAsZerosAndTakeNoMemory()
    {
        using var t = new SparseMemoryTarget(1L << 30);
        var b = new byte[128 * 1024];
        Array.Fill(b, (byte)0xcc);
        Assert.Equal(b.Length, t.Read(b, (1L << 30) - b.Length));
        Assert.All(b, x => Assert.Equal(0, x));
        Assert.Equal(0, t.AllocatedBytes);
    }

    [Theory]
    [InlineData(0, 4096, 1)]
    [InlineData(1, 1, 1)]
    [InlineData(4095, 2, 2)]
    [InlineData(4096 + 512, 3 * 4096, 4)]
    [InlineData(12345, 70000, 18)]
    public void RoundTripsAndAllocatesOnlyTheBlocksTouched(int offset, int length, int blocks)
    {
        using var t = new SparseMemoryTarget(1 << 20);
        var data = LoopTargetTests.Pattern(length, offset);
        Assert.Equal(length, t.Write(data, offset));
        Assert.Equal(blocks * Block, t.AllocatedBytes);

        var back = new byte[length];
        Assert.Equal(length, t.Read(back, offset));
        Assert.Equal(data, back);

        var all = new byte[1 << 20];
        Assert.Equal(all.Length, t.Read(all, 0));
        Assert.Equal(data, all.AsSpan(offset, length).ToArray());
        Assert.Equal(0, all.AsSpan(0, offset).IndexOfAnyExcept((byte)0) + 1);
        Assert.Equal(-1, all.AsSpan(offset + length).IndexOfAnyExcept((byte)0));
    }

    [Fact]
    public void DiscardFreesWholeBlocksAndZeroesTheEdges()
    {
        using var t = new SparseMemoryTarget(1 << 20);
        var data = LoopTargetTests.Pattern(16 * Block, 1);
        t.Write(data, 0);
        Assert.Equal(16 * Block, t.AllocatedBytes);

        // Blocks 2 to 5 whole, the second half of block 1 and the first 100 bytes of block 6.
        const int offset = Block + 2048, length = 2048 + (4 * Block) + 100;
        Assert.Equal(0, t.Discard(offset, length));
        Assert.Equal(12 * Block, t.AllocatedBytes);

        var expected = (byte[])data.Clone();
        Array.Clear(expected, offset, length);
        var back = new byte[16 * Block];
        t.Read(back, 0);
        Assert.Equal(expected, back);

        // Discarding nothing, or what is already free, changes nothing.
        Assert.Equal(0, t.Discard(offset, 0));
        Assert.Equal(0, t.Discard(100 * Block, 10 * Block));
        Assert.Equal(12 * Block, t.AllocatedBytes);
    }

    [Theory]
    [InlineData(true, 12)]
    [InlineData(false, 16)]
    public void WriteZeroesFreesBlocksOnlyWhenItMayUnmap(bool mayUnmap, int blocksLeft)
    {
        using var t = new SparseMemoryTarget(1 << 20);
        var data = LoopTargetTests.Pattern(16 * Block, 2);
        t.Write(data, 0);
        const int offset = 3 * Block, length = (4 * Block) + 1;
        Assert.Equal(0, t.WriteZeroes(offset, length, mayUnmap));
        Assert.Equal(blocksLeft * Block, t.AllocatedBytes);

        var expected = (byte[])data.Clone();
        Array.Clear(expected, offset, length);
        var back = new byte[16 * Block];
        t.Read(back, 0);
        Assert.Equal(expected, back);
    }

    [Fact]
    public void OutOfRangeRequestsFailWithEinval()
    {
        using var t = new SparseMemoryTarget(64 * 1024);
        var b = new byte[4096];
        Assert.Equal(-Errno.EINVAL, t.Read(b, (64 * 1024) - 512));
        Assert.Equal(-Errno.EINVAL, t.Write(b, -1));
        Assert.Equal(-Errno.EINVAL, t.Write(b, long.MaxValue));
        Assert.Equal(-Errno.EINVAL, t.Discard(0, (64 * 1024) + 1));
        Assert.Equal(-Errno.EINVAL, t.WriteZeroes(long.MaxValue - 10, 4096, mayUnmap: true));
        Assert.Equal(0, t.AllocatedBytes);
        Assert.Equal(4096, t.Write(b, (64 * 1024) - 4096));
    }

    [Fact]
    public void BehavesLikeTheMemoryTargetUnderRandomOps()
    {
        // The mem target as the model: the same random ops on both must leave the same bytes.
        const int size = 1 << 20;
        using var sparse = new SparseMemoryTarget(size);
        using var model = new MemoryTarget(size);
        var rnd = new Random(1234);
        for (var i = 0; i < 2000; i++)
        {
            var offset = rnd.Next(size / 512) * 512L;
            var length = (int)Math.Min(size - offset, rnd.Next(1, 129) * 512L);
            switch (rnd.Next(4))
            {
                case 0:
                case 1:
                    var data = new byte[length];
                    rnd.NextBytes(data);
                    Assert.Equal(length, sparse.Write(data, offset));
                    model.Write(data, offset);
                    break;
                case 2:
                    Assert.Equal(0, sparse.Discard(offset, length));
                    model.Discard(offset, length);
                    break;
                default:
                    var mayUnmap = rnd.Next(2) == 0;
                    Assert.Equal(0, sparse.WriteZeroes(offset, length, mayUnmap));
                    model.WriteZeroes(offset, length, mayUnmap);
                    break;
            }
        }
        var a = new byte[size];
        var b = new byte[size];
        sparse.Read(a, 0);
        model.Read(b, 0);
        Assert.Equal(b, a);
        Assert.InRange(sparse.AllocatedBytes, 4096, size);
    }

    [Fact]
    public void QueuesMayCallItConcurrently()
    {
        // One thread per queue: four writers and readers at once, each on its own stripe of blocks.
        const int threads = 4, rounds = 300;
        using var t = new SparseMemoryTarget(threads * 64 * Block);
        var failures = 0;
        Parallel.For(0, threads, new ParallelOptions { MaxDegreeOfParallelism = threads }, q =>
        {
            var rnd = new Random(q);
            var data = new byte[2 * Block];
            var back = new byte[2 * Block];
            for (var i = 0; i < rounds; i++)
            {
                rnd.NextBytes(data);
                var offset = ((q * 64) + rnd.Next(63)) * (long)Block;
                t.Write(data, offset);
                t.Read(back, offset);
                if (!back.AsSpan().SequenceEqual(data))
                {
                    Interlocked.Increment(ref failures);
                }
                t.Discard(offset, Block);
                t.Read(back, offset);
                if (back.AsSpan(0, Block).IndexOfAnyExcept((byte)0) >= 0 || !back.AsSpan(Block).SequenceEqual(data.AsSpan(Block)))
                {
                    Interlocked.Increment(ref failures);
                }
            }
        });
        Assert.Equal(0, failures);
    }
}
