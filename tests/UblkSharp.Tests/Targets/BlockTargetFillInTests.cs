using UblkSharp.Interop;
using UblkSharp.Targets;

namespace UblkSharp.Tests.Targets;

/// <summary>What the runtime fills in for a target that overrides only part of <see cref="BlockTarget"/>.</summary>
public class BlockTargetFillInTests
{
    /// <summary>The least a target can be: a size, a name and reads.</summary>
    private sealed class ReadOnlyTarget : BlockTarget
    {
        public override long Size => 1 << 20;

        public override string Kind => "ro";

        public override int Read(Span<byte> buffer, long offset)
        {
            buffer.Fill(0x42);
            return buffer.Length;
        }
    }

    /// <summary>A writable RAM target whose Write can be scripted to go short, ask for a retry, or fail.</summary>
    private unsafe class ScriptedTarget : BlockTarget
    {
        public const int Cap = 100_000;

        public byte[] Data { get; } = new byte[1 << 20];

        public List<string> Calls { get; } = [];

        public List<int> WriteLengths { get; } = [];

        /// <summary>Where each written buffer started, modulo 4096.</summary>
        public List<long> WriteAlignments { get; } = [];

        /// <summary>Given the call number (from 0) and the length asked for, what Write does; null writes it all.</summary>
        public Func<int, int, int>? Script { get; set; }

        public override long Size => Data.Length;

        public override string Kind => "scripted";

        public override int Read(Span<byte> buffer, long offset)
        {
            Data.AsSpan((int)offset, buffer.Length).CopyTo(buffer);
            return buffer.Length;
        }

        public override int Write(ReadOnlySpan<byte> data, long offset)
        {
            var call = WriteLengths.Count;
            Calls.Add("write");
            WriteLengths.Add(data.Length);
            fixed (byte* p = data)
            {
                WriteAlignments.Add((long)p % 4096);
            }
            if (call >= Cap)
            {
                // A fill-in that never gives up would hang the queue thread; fail the test instead.
                return -Errno.E2BIG;
            }
            var n = Script?.Invoke(call, data.Length) ?? data.Length;
            if (n > 0)
            {
                data[..n].CopyTo(Data.AsSpan((int)offset));
            }
            return n;
        }
    }

    private sealed class CachedTarget : ScriptedTarget
    {
        public int FlushResult { get; set; }

        public override int Flush()
        {
            Calls.Add("flush");
            return FlushResult;
        }
    }

    private sealed class DiscardingTarget : ScriptedTarget
    {
        public override int Discard(long offset, long length) => 0;
    }

    /// <summary>Overrides through an intermediate class, and adds public overloads of the same names.</summary>
    private sealed class OverloadingTarget : ScriptedTarget
    {
        public int Write(byte[] data, long offset) => Write(data.AsSpan(), offset);

        public override int Flush() => 0;

        public int Flush(bool everything) => everything ? Flush() : 0;

        public int Discard(long offset) => Discard(offset, 4096);
    }

    private sealed class OverloadOnlyTarget : BlockTarget
    {
        public override long Size => 4096;

        public override string Kind => "overload-only";

        public override int Read(Span<byte> buffer, long offset) => buffer.Length;

        // Not an override: the target is still read-only and has no cache.
        public int Write(byte[] data) => data.Length + (int)Size;

        public int Flush(int how) => how + (int)Size;
    }

    /// <summary>Hides Flush with <c>new</c>: the runtime calls the virtual one, so there is no cache to flush.</summary>
    private sealed class HidingTarget : ScriptedTarget
    {
        public new int Flush() => (int)Size;
    }

    [Fact]
    public void ATargetThatOnlyReadsIsReadOnly()
    {
        using var t = new ReadOnlyTarget();
        Assert.True(t.IsReadOnly);
        Assert.False(t.CanDiscard);
        Assert.False(t.CanWriteZeroes);
        Assert.False(t.HasVolatileCache);
        Assert.False(t.HasNativeFua);
        Assert.False(t.IsRotational);
        Assert.Equal(512, t.LogicalBlockSize);
        Assert.Equal(4096, t.PhysicalBlockSize);
        Assert.Empty(t.Recipe);
        Assert.Null(t.CreateUringBackend(0));

        Assert.Equal(-Errno.EROFS, t.Write(new byte[512], 0));
        Assert.Equal(-Errno.EROFS, t.WriteFua(new byte[512], 0));
        Assert.Equal(-Errno.EROFS, t.WriteZeroes(0, 4096, mayUnmap: true));
        Assert.Equal(-Errno.EOPNOTSUPP, t.Discard(0, 4096));
        Assert.Equal(0, t.Flush());
        var b = new byte[100];
        Assert.Equal(100, t.Read(b, 0));
        Assert.All(b, x => Assert.Equal(0x42, x));
    }

    [Fact]
    public void OverridingWriteMakesItWritableWithWriteZeroes()
    {
        using var t = new ScriptedTarget();
        Assert.False(t.IsReadOnly);
        Assert.True(t.CanWriteZeroes);
        Assert.False(t.CanDiscard);
        Assert.False(t.HasVolatileCache);
        Assert.Equal(-Errno.EOPNOTSUPP, t.Discard(0, 4096));
    }

    [Fact]
    public void OverridingFlushTurnsOnTheVolatileCache()
    {
        using var t = new CachedTarget();
        Assert.True(t.HasVolatileCache);
        Assert.False(t.IsReadOnly);
        Assert.False(t.CanDiscard);
        Assert.False(t.HasNativeFua);
    }

    [Fact]
    public void OverridingDiscardTurnsOnDiscard()
    {
        using var t = new DiscardingTarget();
        Assert.True(t.CanDiscard);
        Assert.False(t.HasVolatileCache);
    }

    [Fact]
    public void OverloadsOfTheSameNamesDoNotConfuseTheDetection()
    {
        using var t = new OverloadingTarget();
        Assert.False(t.IsReadOnly);
        Assert.True(t.HasVolatileCache);
        Assert.False(t.CanDiscard);

        using var h = new HidingTarget();
        Assert.False(h.HasVolatileCache);
        Assert.False(h.IsReadOnly);

        using var o = new OverloadOnlyTarget();
        Assert.True(o.IsReadOnly);
        Assert.False(o.HasVolatileCache);
        Assert.False(o.CanWriteZeroes);
    }

    private static ScriptedTarget Filled()
    {
        var t = new ScriptedTarget();
        Array.Fill(t.Data, (byte)0xee);
        return t;
    }

    private static void AssertZeroedExactly(ScriptedTarget t, int offset, int length)
    {
        var expected = new byte[t.Data.Length];
        Array.Fill(expected, (byte)0xee);
        Array.Clear(expected, offset, length);
        Assert.Equal(expected, t.Data);
    }

    [Fact]
    public void WriteZeroesWritesZerosIn64KiBChunks()
    {
        using var t = Filled();
        const int offset = 4096 + 512, length = (200 * 1024) + 512;
        Assert.Equal(0, t.WriteZeroes(offset, length, mayUnmap: true));
        AssertZeroedExactly(t, offset, length);
        Assert.Equal([65536, 65536, 65536, 8704], t.WriteLengths);
    }

    [Fact]
    public void WriteZeroesWritesFromPageAlignedMemory()
    {
        // So that a backing file opened with O_DIRECT takes the fill-in's zeros as they are.
        using var t = Filled();
        Assert.Equal(0, t.WriteZeroes(0, 3 * 65536, mayUnmap: false));
        Assert.Equal([0L, 0L, 0L], t.WriteAlignments);
    }

    [Fact]
    public void WriteZeroesOfNothingWritesNothing()
    {
        using var t = Filled();
        Assert.Equal(0, t.WriteZeroes(4096, 0, mayUnmap: false));
        Assert.Empty(t.WriteLengths);
    }

    [Fact]
    public void WriteZeroesContinuesAfterShortWrites()
    {
        using var t = Filled();
        t.Script = (_, asked) => Math.Min(asked, 1000);
        const int offset = 512, length = 10 * 1024;
        Assert.Equal(0, t.WriteZeroes(offset, length, mayUnmap: false));
        AssertZeroedExactly(t, offset, length);
        Assert.Equal(11, t.WriteLengths.Count);
        Assert.Equal(length - (10 * 1000), t.WriteLengths[^1]);
    }

    [Fact]
    public void WriteZeroesRetriesEagain()
    {
        using var t = Filled();
        t.Script = (call, asked) => call % 2 == 0 ? -Errno.EAGAIN : asked;
        const int offset = 1024, length = 3 * 65536;
        Assert.Equal(0, t.WriteZeroes(offset, length, mayUnmap: true));
        AssertZeroedExactly(t, offset, length);
        Assert.Equal(6, t.WriteLengths.Count);
    }

    [Fact]
    public void WriteZeroesStopsAtTheFirstError()
    {
        using var t = Filled();
        t.Script = (call, asked) => call == 1 ? -Errno.ENOSPC : asked;
        Assert.Equal(-Errno.ENOSPC, t.WriteZeroes(0, 4 * 65536, mayUnmap: true));
        Assert.Equal(2, t.WriteLengths.Count);
        AssertZeroedExactly(t, 0, 65536);
    }

    [Fact]
    public void WriteZeroesFailsAWriteThatMakesNoProgress()
    {
        // As the runtime does for a WRITE step that returns 0: it would otherwise spin forever.
        using var t = Filled();
        t.Script = (call, asked) => call == 0 ? asked : 0;
        Assert.Equal(-Errno.EIO, t.WriteZeroes(0, 4 * 65536, mayUnmap: true));
        Assert.Equal(2, t.WriteLengths.Count);
    }

    [Fact]
    public void WriteZeroesGivesUpOnEndlessEagain()
    {
        using var t = Filled();
        t.Script = (_, _) => -Errno.EAGAIN;
        Assert.Equal(-Errno.EIO, t.WriteZeroes(0, 4096, mayUnmap: true));
        Assert.InRange(t.WriteLengths.Count, 2, ScriptedTarget.Cap - 1);
    }

    [Fact]
    public void WriteFuaIsAWriteThenAFlush()
    {
        using var t = new CachedTarget();
        var data = new byte[4096];
        Array.Fill(data, (byte)9);
        Assert.Equal(4096, t.WriteFua(data, 8192));
        Assert.Equal(["write", "flush"], t.Calls);
        Assert.Equal(data, t.Data.AsSpan(8192, 4096).ToArray());
    }

    [Fact]
    public void WriteFuaReportsAFlushError()
    {
        using var t = new CachedTarget { FlushResult = -Errno.EIO };
        Assert.Equal(-Errno.EIO, t.WriteFua(new byte[4096], 0));
        Assert.Equal(["write", "flush"], t.Calls);
    }

    [Fact]
    public void WriteFuaDoesNotFlushAFailedWrite()
    {
        using var t = new CachedTarget { Script = (_, _) => -Errno.ENOSPC };
        Assert.Equal(-Errno.ENOSPC, t.WriteFua(new byte[4096], 0));
        Assert.Equal(["write"], t.Calls);
    }

    [Fact]
    public void WriteFuaOfAShortWriteFlushesWhatWasWritten()
    {
        using var t = new CachedTarget { Script = (_, _) => 512 };
        Assert.Equal(512, t.WriteFua(new byte[4096], 0));
        Assert.Equal(["write", "flush"], t.Calls);
    }

    [Fact]
    public void WriteFuaWithoutACacheJustWrites()
    {
        using var t = new ScriptedTarget();
        Assert.Equal(4096, t.WriteFua(new byte[4096], 0));
        Assert.Equal(["write"], t.Calls);
    }

    private sealed class CountingDisposeTarget : BlockTarget
    {
        public int Disposals;

        public override long Size => 1 << 20;

        public override string Kind => "counting";

        public override int Read(Span<byte> buffer, long offset) => buffer.Length;

        protected override void Dispose(bool disposing)
        {
            Disposals++;
            base.Dispose(disposing);
        }
    }

    [Fact]
    public void DisposeReleasesATargetOnce()
    {
        var t = new CountingDisposeTarget();
        t.Dispose();
        t.Dispose();
        ((IDisposable)t).Dispose();
        Assert.Equal(1, t.Disposals);
    }
}
