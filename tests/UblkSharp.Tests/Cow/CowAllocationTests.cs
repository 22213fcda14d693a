using System.Diagnostics;
using System.Globalization;
using System.Runtime.InteropServices;
using UblkSharp.Interop.IoUring;
using UblkSharp.Targets;
using UblkSharp.Targets.Cow;
using UblkSharp.Ublk;

namespace UblkSharp.Tests.Cow;

/// <summary>
/// The COW file's data area is allocated a chunk at a time at the first write into it (on the
/// ring and on the synchronous path), never again for the same chunk until a hole is punched in
/// it, and not at all with a chunk of 0; what the device reads never depends on it.
/// </summary>
public sealed unsafe class CowAllocationTests : IDisposable
{
    private const int Size = 8 << 20;
    private const int Chunk = 64 << 10;
    private readonly ScratchDir _dir = new();
    private readonly byte* _buffer = (byte*)NativeMemory.AlignedAlloc(Chunk * 3, 4096);
    private readonly string _backing;
    private readonly string _overlay;

    public CowAllocationTests()
    {
        _backing = _dir.RandomFile("base.img", Size, 5);
        _overlay = _dir.File("overlay.cow");
        CowTarget.CreateOverlay(_overlay, _backing);
    }

    public void Dispose()
    {
        NativeMemory.AlignedFree(_buffer);
        _dir.Dispose();
    }

    [Fact]
    public void TheMapGivesEachChunkOnceClipsAtTheEndAndForgetsPunchedChunks()
    {
        var map = new CowAllocationMap(size: (3 * Chunk) + 4096, Chunk);
        Assert.True(map.NeedsAllocation(70 << 10, 4096, out var start, out var count));
        Assert.Equal((Chunk, (long)Chunk), (start, count));
        map.MarkAllocated(start, count);
        Assert.False(map.NeedsAllocation(Chunk, Chunk, out _, out _));
        // Across three chunks with the middle one done: from the first missing to the last missing.
        Assert.True(map.NeedsAllocation(4096, 2 * Chunk, out start, out count));
        Assert.Equal((0L, 3L * Chunk), (start, count));
        // The last chunk is cut at the device's end.
        Assert.True(map.NeedsAllocation(3 * Chunk, 4096, out start, out count));
        Assert.Equal((3L * Chunk, 4096L), (start, count));
        map.MarkAllocated(0, (3 * Chunk) + 4096);
        Assert.False(map.NeedsAllocation(0, (3 * Chunk) + 4096, out _, out _));
        map.Forget(Chunk + 512, 512);
        Assert.True(map.NeedsAllocation(0, 3 * Chunk, out start, out count));
        Assert.Equal((Chunk, (long)Chunk), (start, count));
        map.Disable();
        Assert.False(map.NeedsAllocation(0, 3 * Chunk, out _, out _));
        Assert.Throws<ArgumentOutOfRangeException>(() => new CowAllocationMap(Size, 3000));
    }

    [Fact]
    public void OnTheRingAChunkIsAllocatedBeforeItsFirstWriteAndAgainOnlyAfterADiscard()
    {
        var before = Blocks(_overlay);
        using var t = new CowTarget(_overlay, new CowOpenOptions { Io = LoopIo.Ring, BitmapWriteback = TimeSpan.Zero });
        using var q = new StepRing(t.CreateUringBackend(0)!);
        Fill(0x31, 4096);
        Assert.Equal(4096, q.Run(0, new BackendRequest(IoOp.Write, IoFlags.None, 70 << 10, 4096, _buffer)));
        var submitted = q.Log.Where(e => e.Submit).ToList();
        Assert.Equal([Opcode.Fallocate, Opcode.Write], submitted.Select(e => e.Op));
        Assert.Equal(t.DataOffset + Chunk, submitted[0].Offset);
        Assert.Equal(Chunk, submitted[0].Length);
        Assert.True(Blocks(_overlay) - before >= Chunk, $"{Blocks(_overlay) - before} bytes allocated for a 64 KiB chunk");

        q.Log.Clear();
        Assert.Equal(4096, q.Run(1, new BackendRequest(IoOp.Write, IoFlags.None, 80 << 10, 4096, _buffer)));
        Assert.Equal([Opcode.Write], q.Log.Where(e => e.Submit).Select(e => e.Op));

        Assert.Equal(0, q.Run(2, new BackendRequest(IoOp.Discard, IoFlags.None, 96 << 10, 4096, null)));
        q.Log.Clear();
        Assert.Equal(4096, q.Run(3, new BackendRequest(IoOp.Write, IoFlags.None, 100 << 10, 4096, _buffer)));
        Assert.Equal([Opcode.Fallocate, Opcode.Write], q.Log.Where(e => e.Submit).Select(e => e.Op));

        // What it reads: the writes, the discarded zeros, the backing file around them.
        Assert.Equal(3 * Chunk, q.Run(4, new BackendRequest(IoOp.Read, IoFlags.None, 0, 3 * Chunk, _buffer)));
        var expected = File.ReadAllBytes(_backing).AsSpan(0, 3 * Chunk).ToArray();
        expected.AsSpan(70 << 10, 4096).Fill(0x31);
        expected.AsSpan(80 << 10, 4096).Fill(0x31);
        expected.AsSpan(96 << 10, 4096).Clear();
        expected.AsSpan(100 << 10, 4096).Fill(0x31);
        Assert.True(new ReadOnlySpan<byte>(_buffer, 3 * Chunk).SequenceEqual(expected));
    }

    [Theory]
    [InlineData(Chunk)]
    [InlineData(0)]
    public void TheSynchronousPathAllocatesTheChunkUnlessTheChunkIsZero(int chunk)
    {
        var before = Blocks(_overlay);
        using (var t = new CowTarget(_overlay, new CowOpenOptions { Io = LoopIo.Sync, BitmapWriteback = TimeSpan.Zero, AllocationChunk = chunk }))
        {
            var data = new byte[4096];
            Array.Fill(data, (byte)0x5a);
            Assert.Equal(4096, t.Write(data, 3 * Chunk));
            var back = new byte[4096];
            Assert.Equal(4096, t.Read(back, 3 * Chunk));
            Assert.Equal(data, back);
        }
        var grown = Blocks(_overlay) - before;
        if (chunk > 0)
        {
            Assert.True(grown >= chunk, $"{grown} bytes allocated for a {chunk}-byte chunk");
        }
        else
        {
            Assert.True(grown < Chunk / 2, $"{grown} bytes allocated with no chunk: the file should stay sparse");
        }
    }

    [Fact]
    public void TheAllocateOptionIsCheckedAndRecorded()
    {
        using (var t = (CowTarget)TargetFactory.Create("cow", new Dictionary<string, string> { ["file"] = _overlay, ["allocate"] = "1M" }))
        {
            Assert.Equal(1 << 20, t.Allocation!.Chunk);
            Assert.Equal("1048576", t.Recipe["allocate"]);
        }
        using (var t = (CowTarget)TargetFactory.Create("cow", new Dictionary<string, string> { ["file"] = _overlay, ["allocate"] = "0" }))
        {
            Assert.Null(t.Allocation);
            Assert.Equal("0", t.Recipe["allocate"]);
        }
        using (var t = (CowTarget)TargetFactory.Create("cow", new Dictionary<string, string> { ["file"] = _overlay }))
        {
            Assert.Equal(CowOpenOptions.DefaultAllocationChunk, t.Allocation!.Chunk);
            Assert.False(t.Recipe.ContainsKey("allocate"));
        }
        foreach (var bad in new[] { "3K", "2048", "lots" })
        {
            var e = Assert.Throws<ArgumentException>(() => TargetFactory.Create("cow", new Dictionary<string, string> { ["file"] = _overlay, ["allocate"] = bad }).Dispose());
            Assert.Equal($"--allocate {bad}: give 0 (no allocation ahead) or a power of two of at least 4K, e.g. 64K or 1M", e.Message);
        }
    }

    private void Fill(byte value, int length) => new Span<byte>(_buffer, length).Fill(value);

    /// <summary>The file's allocated bytes (st_blocks), as stat(1) reports them.</summary>
    private static long Blocks(string path)
    {
        using var p = Process.Start(new ProcessStartInfo("stat", ["-c", "%b %B", path]) { RedirectStandardOutput = true })!;
        var fields = p.StandardOutput.ReadToEnd().Split(' ', StringSplitOptions.TrimEntries);
        p.WaitForExit();
        return long.Parse(fields[0], CultureInfo.InvariantCulture) * long.Parse(fields[1], CultureInfo.InvariantCulture);
    }
}
