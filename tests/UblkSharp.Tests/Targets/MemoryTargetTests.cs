using UblkSharp.Targets;

namespace UblkSharp.Tests.Targets;

public class MemoryTargetTests
{
    private const int Page = 4096;

    private static byte[] Random(int length, int seed)
    {
        var b = new byte[length];
        new Random(seed).NextBytes(b);
        return b;
    }

    private static byte[] ReadAll(BlockTarget t)
    {
        var b = new byte[t.Size];
        Assert.Equal(b.Length, t.Read(b, 0));
        return b;
    }

    [Fact]
    public void DescribesItself()
    {
        using var t = new MemoryTarget(1 << 20);
        Assert.Equal(1L << 20, t.Size);
        Assert.Equal("mem", t.Kind);
        Assert.Equal("1048576", t.Recipe["size"]);
        Assert.False(t.IsReadOnly);
        Assert.True(t.CanDiscard);
        Assert.True(t.CanWriteZeroes);
        Assert.False(t.HasVolatileCache);
        Assert.False(t.HasNativeFua);
        Assert.Equal(512, t.LogicalBlockSize);
        Assert.Null(t.CreateUringBackend(0));
    }

    [Theory]
    [InlineData(0L)]
    [InlineData(-4096L)]
    [InlineData(512L)]
    [InlineData(4097L)]
    [InlineData(6000L)]
    public void RejectsSizesThatAreNotPositiveMultiplesOfAPage(long size)
    {
        var e = Assert.Throws<ArgumentOutOfRangeException>(() => new MemoryTarget(size));
        Assert.StartsWith("The size must be a positive multiple of 4096 bytes", e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void StartsZeroed()
    {
        using var t = new MemoryTarget(64 * 1024);
        var b = new byte[t.Size];
        Array.Fill(b, (byte)0x5a);
        Assert.Equal(b.Length, t.Read(b, 0));
        Assert.All(b, x => Assert.Equal(0, x));
    }

    [Theory]
    [InlineData(0, 4096)]
    [InlineData(1, 1)]
    [InlineData(4095, 2)]
    [InlineData(4095, 10001)]
    [InlineData(12345, 70000)]
    [InlineData(262144 - 7, 7)]
    public void RoundTripsAtOddOffsets(int offset, int length)
    {
        using var t = new MemoryTarget(256 * 1024);
        var data = Random(length, offset);
        Assert.Equal(length, t.Write(data, offset));

        var back = new byte[length];
        Assert.Equal(length, t.Read(back, offset));
        Assert.Equal(data, back);

        // Nothing outside the written range changed, and a read straddling its start sees both.
        var all = ReadAll(t);
        Assert.Equal(data, all.AsSpan(offset, length).ToArray());
        Assert.All(all.AsSpan(0, offset).ToArray(), x => Assert.Equal(0, x));
        Assert.All(all.AsSpan(offset + length).ToArray(), x => Assert.Equal(0, x));
        if (offset > 0)
        {
            var straddle = new byte[2];
            t.Read(straddle, offset - 1);
            Assert.Equal(new byte[] { 0, data[0] }, straddle);
        }
    }

    public static TheoryData<int, int> Ranges => new()
    {
        { 10, 20 },                 // inside one page
        { 4000, 200 },              // across a page boundary, no whole page
        { 100, 4096 },              // a page's worth, no whole page
        { 100, (3 * Page) + 50 },   // partial head, two whole pages, partial tail
        { Page, 2 * Page },         // whole pages only
        { Page, (2 * Page) + 1 },   // whole pages and a one-byte tail
        { Page - 1, Page + 1 },     // a one-byte head and one whole page
        { 0, 8 * Page },            // everything
    };

    [Theory]
    [MemberData(nameof(Ranges))]
    public void DiscardReadsBackZerosAndKeepsTheEdges(int offset, int length)
        => ZeroesRange(offset, length, t => t.Discard(offset, length));

    [Theory]
    [MemberData(nameof(Ranges))]
    public void WriteZeroesMayUnmapReadsBackZerosAndKeepsTheEdges(int offset, int length)
        => ZeroesRange(offset, length, t => t.WriteZeroes(offset, length, mayUnmap: true));

    [Theory]
    [MemberData(nameof(Ranges))]
    public void WriteZeroesNoUnmapReadsBackZerosAndKeepsTheEdges(int offset, int length)
        => ZeroesRange(offset, length, t => t.WriteZeroes(offset, length, mayUnmap: false));

    private static void ZeroesRange(int offset, int length, Func<MemoryTarget, int> zero)
    {
        using var t = new MemoryTarget(8 * Page);
        var data = Random(8 * Page, length);
        data.AsSpan().Replace((byte)0, (byte)1); // no zero bytes, so every zero read back was made by the call
        t.Write(data, 0);

        Assert.Equal(0, zero(t));

        var all = ReadAll(t);
        var expected = (byte[])data.Clone();
        Array.Clear(expected, offset, length);
        Assert.Equal(expected, all);

        // The released pages are usable again.
        t.Write(data, 0);
        Assert.Equal(data, ReadAll(t));
    }
}
