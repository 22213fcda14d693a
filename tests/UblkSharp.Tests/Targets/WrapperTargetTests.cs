using UblkSharp.Interop;
using UblkSharp.Targets;

namespace UblkSharp.Tests.Targets;

/// <summary>
/// A user's own wrapper around mem, written only against the public API, and the fault target:
/// both answer with the inner target's capabilities, and their filters see step results.
/// </summary>
public class WrapperTargetTests
{
    /// <summary>What a user would write: count the writes, and see every step result.</summary>
    internal sealed class CountingWrapper(BlockTarget inner, bool ownsInner = true) : WrapperTarget(inner, ownsInner)
    {
        private long _writes;
        private long _filtered;

        public long Writes => Interlocked.Read(ref _writes);

        public long Filtered => Interlocked.Read(ref _filtered);

        public override string Kind => "counting";

        public override int Write(ReadOnlySpan<byte> data, long offset)
        {
            Interlocked.Increment(ref _writes);
            return base.Write(data, offset);
        }

        public override ResultFilter? CreateResultFilter(int streamId) => ResultFilter.Chain(Inner.CreateResultFilter(streamId), new Counter(this));

        private sealed class Counter(CountingWrapper owner) : ResultFilter
        {
            public override int Apply(int result, bool isData, int blockSize)
            {
                Interlocked.Increment(ref owner._filtered);
                return result;
            }
        }
    }

    private sealed class ReadOnlyZeros : BlockTarget
    {
        public override long Size => 1 << 20;

        public override string Kind => "ro";

        public override int Read(Span<byte> buffer, long offset)
        {
            buffer.Clear();
            return buffer.Length;
        }
    }

    /// <summary>Writable, with no write-zeroes of its own: zeroing it is never fast.</summary>
    private sealed class PlainWritable : BlockTarget
    {
        public override long Size => 1 << 20;

        public override string Kind => "plain";

        public override int Read(Span<byte> buffer, long offset) => buffer.Length;

        public override int Write(ReadOnlySpan<byte> data, long offset) => data.Length;
    }

    private static object[] Capabilities(BlockTarget t) =>
    [
        t.Size, t.LogicalBlockSize, t.PhysicalBlockSize, t.IsReadOnly, t.HasVolatileCache, t.CanDiscard,
        t.CanWriteZeroes, t.CanFastZero, t.HasNativeFua, t.IsRotational, t.SurvivesRestart, t.SurvivesHandOver,
    ];

    public static TheoryData<string> Inners => ["mem", "null", "loop", "loop-ro", "read-only", "plain"];

    private static BlockTarget Make(string kind, TempFile file) => kind switch
    {
        "mem" => new MemoryTarget(1 << 20),
        "null" => new NullTarget(1 << 20),
        "loop" => new LoopTarget(file.Path),
        "loop-ro" => new LoopTarget(file.Path, readOnly: true),
        "plain" => new PlainWritable(),
        _ => new ReadOnlyZeros(),
    };

    [Theory]
    [MemberData(nameof(Inners))]
    public void FaultAndUserWrappersAnswerWithTheInnerTargetsCapabilities(string kind)
    {
        using var file = new TempFile(4 << 20);
        using var inner = Make(kind, file);
        using var fault = new FaultTarget(inner, new FaultSchedule { ShortIo = 0.5 });
        using var user = new CountingWrapper(inner);
        // Reflection over overrides would call both wrappers writable, cached, discarding and fast-zeroing.
        Assert.Equal(Capabilities(inner), Capabilities(fault));
        Assert.Equal(Capabilities(inner), Capabilities(user));
        Assert.Equal(Capabilities(inner), Capabilities(new CountingWrapper(fault)));
    }

    [Fact]
    public void AllocationAndCacheComeFromTheInnerTarget()
    {
        // A sparse file: data in the first MiB, a hole after it.
        using var file = new TempFile(8 << 20);
        using (var fs = new FileStream(file.Path, FileMode.Open, FileAccess.Write))
        {
            fs.Write(LoopTargetTests.Pattern(1 << 20, 1));
            fs.Flush(flushToDisk: true);
        }
        using var loop = new LoopTarget(file.Path);
        using var fault = new FaultTarget(loop, new FaultSchedule());
        using var user = new CountingWrapper(fault);
        foreach (var offset in new long[] { 0, 1 << 20, 4 << 20 })
        {
            var want = loop.GetAllocation(offset, (8 << 20) - offset, out var wantFlags);
            Assert.Equal(want, fault.GetAllocation(offset, (8 << 20) - offset, out var faultFlags));
            Assert.Equal(wantFlags, faultFlags);
            Assert.Equal(want, user.GetAllocation(offset, (8 << 20) - offset, out var userFlags));
            Assert.Equal(wantFlags, userFlags);
        }
        Assert.True(loop.GetAllocation(4 << 20, 1 << 20, out var hole) > 0 && hole != AllocationFlags.None, "the test file has no hole to report");
        Assert.Equal(loop.Cache(0, 4096), user.Cache(0, 4096));
    }

    [Fact]
    public void WrappersPassTheInnerBackendAndChainFilters()
    {
        using var file = new TempFile(4 << 20);
        using var loop = new LoopTarget(file.Path, io: LoopIo.Ring);
        using var user = new CountingWrapper(new FaultTarget(loop, new FaultSchedule { Again = 1 }), ownsInner: false);
        using (var backend = user.CreateUringBackend(0))
        using (var direct = loop.CreateUringBackend(0))
        {
            Assert.NotNull(backend);
            Assert.Equal(direct!.GetType(), backend.GetType());
        }
        // The fault filter sits inside the user's: the user's sees the injected EAGAIN.
        var filter = user.CreateResultFilter(0);
        Assert.NotNull(filter);
        Assert.Equal(-Errno.EAGAIN, filter.Apply(4096, isData: true, 512));
        Assert.Equal(1, user.Filtered);
        Assert.Null(new MemoryTarget(4096).CreateResultFilter(0));
    }

    [Fact]
    public void DisposingAWrapperDisposesItsInnerTargetUnlessTold()
    {
        var inner = new Tracked();
        new CountingWrapper(inner, ownsInner: false).Dispose();
        Assert.False(inner.Disposed);
        new CountingWrapper(inner).Dispose();
        Assert.True(inner.Disposed);
    }

    private sealed class Tracked : BlockTarget
    {
        public bool Disposed { get; private set; }

        public override long Size => 4096;

        public override string Kind => "tracked";

        public override int Read(Span<byte> buffer, long offset) => buffer.Length;

        protected override void Dispose(bool disposing)
        {
            Disposed = true;
            base.Dispose(disposing);
        }
    }
}
