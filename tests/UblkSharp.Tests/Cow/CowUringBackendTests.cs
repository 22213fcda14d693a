using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using UblkSharp.Interop;
using UblkSharp.Interop.IoUring;
using UblkSharp.Targets;
using UblkSharp.Targets.Cow;
using UblkSharp.Ublk;

namespace UblkSharp.Tests.Cow;

/// <summary>
/// The cow target's io_uring path on a real ring on the host, driven as a queue drives it (files
/// registered after a hole at index 0, steps started and completed through <see cref="IBackendRing"/>),
/// with every SQE and completion logged so a test can check the order of data, syncs and bitmap writes.
/// </summary>
internal sealed unsafe class StepRing : IBackendRing, IDisposable
{
    private readonly List<nint> _unsent = [];
    private readonly Dictionary<ulong, int> _submitted = [];

    public StepRing(UringBackend backend)
    {
        Backend = backend;
        Ring = Ring.Create(new RingOptions { Entries = 256, CompletionEntries = 1024, SingleIssuer = true, DeferTaskrun = true });
        int[] files = [-1, .. backend.Files];
        Ring.RegisterFiles(files);
    }

    public UringBackend Backend { get; }

    public Ring Ring { get; }

    public Dictionary<int, int> Results { get; } = [];

    public List<Event> Log { get; } = [];

    public int InFlight { get; private set; }

    /// <summary>An SQE as submitted (Data: what a WRITE wrote, copied at submission), or its completion (Res).</summary>
    public sealed record Event(int Seq, bool Submit, Opcode Op, int File, long Offset, long Length, byte[]? Data, int Res, int Ref);

    public ref Sqe GetSqe(int tag, uint stepId, out ulong userData)
    {
        // A serial in bits 16-31 keeps user_data unique per SQE, so a completion finds its submission.
        userData = (uint)tag | ((ulong)(ushort)Log.Count << 16) | ((ulong)stepId << 32);
        InFlight++;
        ref var sqe = ref Ring.GetSqe();
        _unsent.Add((nint)Unsafe.AsPointer(ref sqe));
        return ref sqe;
    }

    public void Complete(int tag, int result)
    {
        Assert.False(Results.ContainsKey(tag), $"tag {tag} completed twice");
        Results[tag] = result;
    }

    public void Start(int tag, in BackendRequest request)
    {
        var r = Backend.Start(this, tag, request);
        if (r != UringBackend.Pending)
        {
            Complete(tag, r);
        }
    }

    /// <summary>Submits what is queued, waits for a completion and hands every ready one to the backend.</summary>
    public void Pump()
    {
        foreach (var p in _unsent)
        {
            var s = (Sqe*)p;
            byte[]? data = s->opcode == Opcode.Write ? new ReadOnlySpan<byte>((void*)s->addr, (int)s->len).ToArray() : null;
            var length = s->opcode == Opcode.Fallocate ? (long)s->addr : s->len;
            _submitted[s->user_data] = Log.Count;
            Log.Add(new Event(Log.Count, true, s->opcode, s->fd, (long)s->off, length, data, 0, -1));
        }
        _unsent.Clear();
        Ring.SubmitAndWait(1);
        while (Ring.TryGetCompletion(out var cqe))
        {
            InFlight--;
            var sub = Log[_submitted[cqe.user_data]];
            Log.Add(new Event(Log.Count, false, sub.Op, sub.File, sub.Offset, sub.Length, null, cqe.res, sub.Seq));
            Backend.OnStep(this, (int)(cqe.user_data & 0xffff), (uint)(cqe.user_data >> 32), cqe.res);
        }
    }

    /// <summary>Pumps until every started request has a result and no SQE is in flight.</summary>
    public void Drain(int started)
    {
        var deadline = Environment.TickCount64 + 60_000;
        while (Results.Count < started || InFlight > 0 || _unsent.Count > 0)
        {
            Assert.True(Environment.TickCount64 < deadline, $"{Results.Count} of {started} requests done after 60 s, {InFlight} SQEs in flight");
            Pump();
        }
    }

    public int Run(int tag, in BackendRequest request)
    {
        Results.Clear();
        Start(tag, request);
        Drain(1);
        return Results[tag];
    }

    public void Dispose()
    {
        Ring.Dispose();
        Backend.Dispose();
    }
}

public sealed unsafe class CowUringBackendTests : IDisposable
{
    private const int Sector = 512;
    private const int Size = 8 << 20;
    private const int Tags = 64;
    private const int TagBytes = 128 * 1024;
    private readonly ScratchDir _dir = new();
    private readonly byte* _buffers = (byte*)NativeMemory.AlignedAlloc(Tags * TagBytes, 4096);
    private readonly byte[] _base;
    private readonly string _overlay;
    private readonly string _backing;

    public CowUringBackendTests()
    {
        var backing = _backing = _dir.RandomFile("base.img", Size, 41);
        _base = File.ReadAllBytes(backing);
        _overlay = _dir.File("overlay.cow");
        CowTarget.CreateOverlay(_overlay, backing);
    }

    public void Dispose()
    {
        NativeMemory.AlignedFree(_buffers);
        _dir.Dispose();
    }

    private byte* Buf(int tag) => _buffers + ((long)tag * TagBytes);

    private CowTarget Open() => new(_overlay, new CowOpenOptions { Io = LoopIo.Ring, BitmapWriteback = TimeSpan.Zero });

    private static BackendRequest Req(IoOp op, long offset, long length, byte* buffer, IoFlags flags = IoFlags.None) => new(op, flags, offset, length, buffer);

    /// <summary>The bitmap as the COW file holds it now.</summary>
    private static byte[] BitmapOnDisk(CowTarget t)
    {
        using var f = new FileStream(t.OverlayPath, FileMode.Open, FileAccess.Read, FileShare.ReadWrite);
        var b = new byte[t.Header.BitmapLength];
        f.Position = t.Header.BitmapOffset;
        f.ReadExactly(b);
        return b;
    }

    private static bool Bit(byte[] bitmap, long sector) => (bitmap[sector / 8] & (1 << (int)(sector % 8))) != 0;

    [Fact]
    public void TheRingIsUsedOnARealFileAndNotForAnInMemoryOne()
    {
        using (var t = Open())
        {
            Assert.True(t.UsesRing);
            using var backend = t.CreateUringBackend(0)!;
            Assert.True(backend.RunsSteps);
            Assert.Equal(3, backend.Files.Count); // the COW file, the backing file, /dev/zero (zeros under zero copy)
        }
        using var sync = new CowTarget(_overlay, new CowOpenOptions { Io = LoopIo.Sync, ReadOnly = true });
        Assert.False(sync.UsesRing);
        Assert.Null(sync.CreateUringBackend(0));
    }

    [Fact]
    public void TheIoOptionChoosesThePathAndIsRecorded()
    {
        using (var t = (CowTarget)TargetFactory.Create("cow", new Dictionary<string, string> { ["file"] = _overlay, ["io"] = "sync" }))
        {
            Assert.False(t.UsesRing);
            Assert.Equal("sync", t.Recipe["io"]);
        }
        using (var t = (CowTarget)TargetFactory.Create("cow", new Dictionary<string, string> { ["file"] = _overlay, ["io"] = "ring" }))
        {
            Assert.True(t.UsesRing);
            Assert.Equal("ring", t.Recipe["io"]);
        }
        using (var t = (CowTarget)TargetFactory.Create("cow", new Dictionary<string, string> { ["file"] = _overlay }))
        {
            Assert.False(t.Recipe.ContainsKey("io")); // auto: the ring unless a file is on tmpfs or ramfs
        }
        var e = Assert.Throws<ArgumentException>(() => TargetFactory.Create("cow", new Dictionary<string, string> { ["file"] = _overlay, ["io"] = "fast" }).Dispose());
        Assert.Equal("--io fast: use ring, sync or auto", e.Message);
    }

    [Fact]
    public void AReadSplitBetweenTheFilesReadsEachRunFromItsFile()
    {
        using var t = Open();
        using var q = new StepRing(t.CreateUringBackend(0)!);
        // Sectors 1, 3-4 and 7 in the COW file; a 4 KiB read at 0 has six runs, planned in order.
        var data = new byte[Sector];
        foreach (var s in new[] { 1, 3, 4, 7 })
        {
            Array.Fill(data, (byte)(0xa0 + s));
            data.CopyTo(new Span<byte>(Buf(0), Sector));
            Assert.Equal(Sector, q.Run(0, Req(IoOp.Write, s * Sector, Sector, Buf(0))));
        }
        new Span<byte>(Buf(1), 4096).Clear();
        Assert.Equal(4096, q.Run(1, Req(IoOp.Read, 0, 4096, Buf(1))));
        var expected = _base.AsSpan(0, 4096).ToArray();
        foreach (var s in new[] { 1, 3, 4, 7 })
        {
            expected.AsSpan(s * Sector, Sector).Fill((byte)(0xa0 + s));
        }
        Assert.Equal(expected, new Span<byte>(Buf(1), 4096).ToArray());
        const int cow = UringBackend.FirstFixedFile, backing = UringBackend.FirstFixedFile + 1;
        var reads = q.Log.Where(e => e.Submit && e.Op == Opcode.Read).ToList();
        Assert.Equal([backing, cow, backing, cow, backing, cow], reads.Select(e => e.File));
        Assert.Equal([512L, 512, 512, 1024, 1024, 512], reads.Select(e => e.Length));
    }

    /// <summary>Up to 64 requests in flight on disjoint ranges, against a model, then reopened synchronously.</summary>
    [Fact]
    public void ManyRequestsInFlightMatchAModel()
    {
        var model = (byte[])_base.Clone();
        var rng = new Random(7);
        using (var t = Open())
        using (var q = new StepRing(t.CreateUringBackend(0)!))
        {
            for (var round = 0; round < 40; round++)
            {
                q.Results.Clear();
                var busy = new List<(long From, long To)>();
                var started = 0;
                var reads = new List<(int Tag, long Offset, int Length)>();
                for (var tag = 0; tag < Tags; tag++)
                {
                    // Small and sector-sized ranges scatter the bits, so reads have many runs.
                    var length = rng.Next(4) == 0 ? rng.Next(1, 256) * Sector : rng.Next(1, 9) * Sector;
                    var offset = (long)rng.Next((Size - length) / Sector) * Sector;
                    if (busy.Any(b => offset < b.To && b.From < offset + length))
                    {
                        continue;
                    }
                    busy.Add((offset, offset + length));
                    started++;
                    var kind = rng.Next(10);
                    if (kind < 4)
                    {
                        var d = new Span<byte>(Buf(tag), length);
                        rng.NextBytes(d);
                        d.CopyTo(model.AsSpan((int)offset, length));
                        q.Start(tag, Req(IoOp.Write, offset, length, Buf(tag), rng.Next(8) == 0 ? IoFlags.Fua : IoFlags.None));
                    }
                    else if (kind < 5)
                    {
                        model.AsSpan((int)offset, length).Clear();
                        q.Start(tag, Req(kind == 4 && rng.Next(2) == 0 ? IoOp.Discard : IoOp.WriteZeroes, offset, length, null, rng.Next(2) == 0 ? IoFlags.NoUnmap : IoFlags.None));
                    }
                    else if (kind < 9)
                    {
                        new Span<byte>(Buf(tag), length).Fill(0xee);
                        reads.Add((tag, offset, length));
                        q.Start(tag, Req(IoOp.Read, offset, length, Buf(tag)));
                    }
                    else
                    {
                        busy.RemoveAt(busy.Count - 1);
                        q.Start(tag, Req(IoOp.Flush, 0, 0, null));
                    }
                }
                q.Drain(started);
                foreach (var (tag, result) in q.Results)
                {
                    Assert.True(result >= 0, $"round {round}, tag {tag}: {Errno.Describe(result)}");
                }
                foreach (var (tag, offset, length) in reads)
                {
                    Assert.True(new Span<byte>(Buf(tag), length).SequenceEqual(model.AsSpan((int)offset, length)), $"round {round}: read of {length} at {offset}");
                }
            }
            Assert.True(t.CowSectors > 0);
        }
        using var reopened = new CowTarget(_overlay, new CowOpenOptions { Io = LoopIo.Sync, ReadOnly = true });
        var all = new byte[Size];
        Assert.Equal(Size, reopened.Read(all, 0));
        Assert.Equal(model, all);
    }

    [Fact]
    public void BitsReachTheFileOnlyAfterTheirDataIsSynced()
    {
        var rng = new Random(8);
        using var t = Open();
        using var q = new StepRing(t.CreateUringBackend(0)!);
        for (var round = 0; round < 20; round++)
        {
            q.Results.Clear();
            var started = 0;
            for (var tag = 0; tag < Tags; tag++)
            {
                var sector = (round * Tags) + tag; // disjoint, and many share a bitmap word
                if (tag % 9 == 8)
                {
                    q.Start(tag, Req(IoOp.Flush, 0, 0, null));
                }
                else
                {
                    rng.NextBytes(new Span<byte>(Buf(tag), Sector));
                    q.Start(tag, Req(IoOp.Write, sector * Sector, Sector, Buf(tag), tag % 5 == 0 ? IoFlags.Fua : IoFlags.None));
                }
                started++;
            }
            q.Drain(started);
        }
        q.Results.Clear();
        Assert.Equal(0, q.Run(0, Req(IoOp.Flush, 0, 0, null)));

        // From the log: when each sector's data write completed, and each fdatasync's span.
        const int cow = UringBackend.FirstFixedFile;
        var h = t.Header;
        var dataDone = new Dictionary<long, int>();
        var syncs = new List<(int Submitted, int Completed)>();
        foreach (var e in q.Log.Where(e => !e.Submit && e.File == cow))
        {
            var sub = q.Log[e.Ref];
            if (e.Op == Opcode.Write && sub.Offset >= h.DataOffset && e.Res > 0)
            {
                for (var s = (sub.Offset - h.DataOffset) / Sector; s < (sub.Offset - h.DataOffset + e.Res) / Sector; s++)
                {
                    dataDone.TryAdd(s, e.Seq);
                }
            }
            if (e.Op == Opcode.Fsync && e.Res == 0)
            {
                syncs.Add((sub.Seq, e.Seq));
            }
        }
        var bitmapWrites = q.Log.Where(e => e.Submit && e.Op == Opcode.Write && e.File == cow && e.Offset >= h.BitmapOffset && e.Offset < h.DataOffset).ToList();
        Assert.NotEmpty(bitmapWrites);
        var checkedBits = 0;
        foreach (var w in bitmapWrites)
        {
            for (var i = 0; i < w.Data!.Length; i++)
            {
                for (var b = 0; b < 8; b++)
                {
                    if ((w.Data[i] & (1 << b)) == 0)
                    {
                        continue;
                    }
                    var sector = ((w.Offset - h.BitmapOffset + i) * 8) + b;
                    Assert.True(dataDone.TryGetValue(sector, out var done), $"bit {sector} written with no data write before it");
                    Assert.True(syncs.Any(s => s.Submitted > done && s.Completed < w.Seq), $"bit {sector} written (event {w.Seq}) before a sync of its data (done at {done})");
                    checkedBits++;
                }
            }
        }
        Assert.True(checkedBits >= 20 * 50, $"{checkedBits} bits checked");
        // And the file agrees: every written sector's bit is there after the last flush.
        var disk = BitmapOnDisk(t);
        Assert.All(dataDone.Keys, s => Assert.True(Bit(disk, s), $"sector {s}"));
    }

    [Fact]
    public void ConcurrentWritesToOneBitmapWordFromTwoQueuesKeepEveryBit()
    {
        using var t = Open();
        var barrier = new Barrier(2);
        var errors = new List<string>();
        void Queue(int queueId)
        {
            try
            {
                using var q = new StepRing(t.CreateUringBackend(queueId)!);
                barrier.SignalAndWait();
                for (var round = 0; round < 8; round++)
                {
                    q.Results.Clear();
                    // Queue 0 the even sectors of word `round`, queue 1 the odd: 32 writes in flight each.
                    for (var i = 0; i < 32; i++)
                    {
                        var tag = i;
                        var sector = (round * 64) + (2 * i) + queueId;
                        var buf = Buf((queueId * 32) + i);
                        new Span<byte>(buf, Sector).Fill((byte)sector);
                        q.Start(tag, Req(IoOp.Write, sector * Sector, Sector, buf));
                    }
                    q.Drain(32);
                    if (q.Results.Values.Any(r => r != Sector))
                    {
                        lock (errors)
                        {
                            errors.Add($"queue {queueId}: {string.Join(",", q.Results.Values)}");
                        }
                    }
                }
                q.Results.Clear();
                Assert.Equal(0, q.Run(40, Req(IoOp.Flush, 0, 0, null)));
            }
            catch (Exception e)
            {
                lock (errors)
                {
                    errors.Add(e.ToString());
                }
            }
        }
        var threads = new[] { new Thread(() => Queue(0)), new Thread(() => Queue(1)) };
        foreach (var th in threads)
        {
            th.Start();
        }
        foreach (var th in threads)
        {
            Assert.True(th.Join(TimeSpan.FromMinutes(2)));
        }
        Assert.Empty(errors);
        var disk = BitmapOnDisk(t);
        for (var s = 0; s < 8 * 64; s++)
        {
            Assert.True(t.IsInCow(s), $"sector {s} in memory");
            Assert.True(Bit(disk, s), $"sector {s} on disk");
        }
        var data = new byte[8 * 64 * Sector];
        Assert.Equal(data.Length, t.Read(data, 0));
        for (var s = 0; s < 8 * 64; s++)
        {
            Assert.True(data.AsSpan(s * Sector, Sector).IndexOfAnyExcept((byte)s) < 0, $"sector {s}");
        }
    }

    [Fact]
    public void FlushOnTheRingMakesDataAndBitmapDurableInOrder()
    {
        using var t = Open();
        using var q = new StepRing(t.CreateUringBackend(0)!);
        new Span<byte>(Buf(0), 8192).Fill(0x5a);
        Assert.Equal(8192, q.Run(0, Req(IoOp.Write, 1 << 20, 8192, Buf(0))));
        Assert.False(Bit(BitmapOnDisk(t), (1 << 20) / Sector), "no writeback, no flush: the bit is only in memory");
        var before = q.Log.Count;
        Assert.Equal(0, q.Run(1, Req(IoOp.Flush, 0, 0, null)));
        // sync (the data under the copied bits), the bitmap page, sync.
        var ops = q.Log.Skip(before).Where(e => e.Submit).Select(e => e.Op).ToList();
        Assert.Equal([Opcode.Fsync, Opcode.Write, Opcode.Fsync], ops);
        var disk = BitmapOnDisk(t);
        for (var s = (1 << 20) / Sector; s < ((1 << 20) + 8192) / Sector; s++)
        {
            Assert.True(Bit(disk, s));
        }
        Assert.False(Bit(disk, ((1 << 20) + 8192) / Sector));
        // A second flush with nothing new to make durable ends at once, without an SQE.
        before = q.Log.Count;
        Assert.Equal(0, q.Run(2, Req(IoOp.Flush, 0, 0, null)));
        Assert.Equal(before, q.Log.Count);
        // A FUA write is durable, bit included, when it completes.
        new Span<byte>(Buf(3), 4096).Fill(0x6b);
        Assert.Equal(4096, q.Run(3, Req(IoOp.Write, 3 << 20, 4096, Buf(3), IoFlags.Fua)));
        Assert.True(Bit(BitmapOnDisk(t), (3 << 20) / Sector));
    }

    [Fact]
    public void AFlushWaitsOnTheRingWhileAnotherPersistHoldsTheToken()
    {
        using var t = Open();
        using var q = new StepRing(t.CreateUringBackend(0)!);
        new Span<byte>(Buf(0), 4096).Fill(1);
        Assert.Equal(4096, q.Run(0, Req(IoOp.Write, 0, 4096, Buf(0))));
        Assert.True(t.TryBeginPersist()); // as the writeback thread or another queue would
        q.Results.Clear();
        q.Start(1, Req(IoOp.Flush, 0, 0, null));
        var polls = 0;
        while (q.Log.Count(e => !e.Submit && e.Op == Opcode.Timeout) < 3)
        {
            q.Pump();
            polls++;
            Assert.True(polls < 10_000);
        }
        Assert.Empty(q.Results);
        t.EndPersist();
        q.Drain(1);
        Assert.Equal(0, q.Results[1]);
        Assert.True(Bit(BitmapOnDisk(t), 0));
    }

    [Theory]
    [InlineData(IoOp.Discard, IoFlags.None)]
    [InlineData(IoOp.WriteZeroes, IoFlags.None)]
    [InlineData(IoOp.WriteZeroes, IoFlags.NoUnmap)]
    public void DiscardAndWriteZeroesReadBackAsZeros(IoOp op, IoFlags flags)
    {
        using var t = Open();
        using var q = new StepRing(t.CreateUringBackend(0)!);
        new Span<byte>(Buf(0), 65536).Fill(0x77);
        Assert.Equal(65536, q.Run(0, Req(IoOp.Write, 0, 65536, Buf(0))));
        Assert.Equal(0, q.Run(1, Req(op, 16384, 65536, null, flags)));
        Assert.Equal(131072, q.Run(2, Req(IoOp.Read, 0, 131072, Buf(2))));
        var got = new Span<byte>(Buf(2), 131072);
        Assert.True(got[..16384].IndexOfAnyExcept((byte)0x77) < 0);
        Assert.True(got[16384..81920].IndexOfAnyExcept((byte)0) < 0, "the zeroed range over COW data and over backing data");
        Assert.True(got[81920..].SequenceEqual(_base.AsSpan(81920, 131072 - 81920)));
        Assert.True(t.IsInCow((16384 + 65536 - 512) / Sector));
    }

    [Fact]
    public void BadRequestsFailAtOnce()
    {
        using var t = Open();
        using var q = new StepRing(t.CreateUringBackend(0)!);
        Assert.Equal(-Errno.EINVAL, q.Run(0, Req(IoOp.Write, 100, 512, Buf(0))));
        Assert.Equal(-Errno.EINVAL, q.Run(0, Req(IoOp.Read, Size - 512, 1024, Buf(0))));
        Assert.Equal(-Errno.EOPNOTSUPP, q.Run(0, Req(IoOp.WriteSame, 0, 512, Buf(0))));
    }

    [Fact]
    public void AReadOnlyOverlayReadsOnTheRingAndRefusesWrites()
    {
        using var t = new CowTarget(_overlay, new CowOpenOptions { Io = LoopIo.Ring, ReadOnly = true });
        using var q = new StepRing(t.CreateUringBackend(0)!);
        Assert.Equal(-Errno.EROFS, q.Run(0, Req(IoOp.Write, 0, 512, Buf(0))));
        Assert.Equal(0, q.Run(0, Req(IoOp.Flush, 0, 0, null)));
        Assert.Equal(4096, q.Run(0, Req(IoOp.Read, 4096, 4096, Buf(0))));
        Assert.True(new Span<byte>(Buf(0), 4096).SequenceEqual(_base.AsSpan(4096, 4096)));
    }

    /// <summary>
    /// Zero copy: reads and writes name a slot of the ring's buffer table (READ_FIXED/WRITE_FIXED;
    /// here slots of our own memory, where the address is a real one), each run from its file, and
    /// the zeros past the end of a backing file cut short behind the target's back come from
    /// /dev/zero into the slot: no plain READ or WRITE at all.
    /// </summary>
    [Fact]
    public void UnderZeroCopyEveryRunMovesThroughTheBufferSlot()
    {
        using var t = Open();
        Assert.True(t.SupportsZeroCopy);
        using var q = new StepRing(t.CreateUringBackend(0)!);
        q.Ring.RegisterBuffers([new Iovec { iov_base = Buf(0), iov_len = TagBytes }, new Iovec { iov_base = Buf(1), iov_len = TagBytes }]);
        new Span<byte>(Buf(0), 8192).Fill(0x5a);
        Assert.Equal(8192, q.Run(0, new BackendRequest(IoOp.Write, IoFlags.None, 65536, 8192, Buf(0), 0)));
        // 4 KiB from the backing file, the 8 KiB just written from the COW file, 4 KiB from the backing file.
        new Span<byte>(Buf(1), 16384).Clear();
        Assert.Equal(16384, q.Run(1, new BackendRequest(IoOp.Read, IoFlags.None, 61440, 16384, Buf(1), 1)));
        var expected = _base.AsSpan(61440, 16384).ToArray();
        expected.AsSpan(4096, 8192).Fill(0x5a);
        Assert.Equal(expected, new Span<byte>(Buf(1), 16384).ToArray());

        // Cut short behind the target's back: a 64 KiB read across the new end has 32 KiB of zeros.
        using (var f = new FileStream(_backing, FileMode.Open, FileAccess.Write))
        {
            f.SetLength(Size / 2);
        }
        new Span<byte>(Buf(1), 65536).Fill(0xff);
        Assert.Equal(65536, q.Run(1, new BackendRequest(IoOp.Read, IoFlags.None, (Size / 2) - 32768, 65536, Buf(1), 1)));
        expected = new byte[65536];
        _base.AsSpan((Size / 2) - 32768, 32768).CopyTo(expected);
        Assert.Equal(expected, new Span<byte>(Buf(1), 65536).ToArray());

        const int zeros = UringBackend.FirstFixedFile + 2;
        var submitted = q.Log.Where(e => e.Submit).ToList();
        Assert.DoesNotContain(submitted, e => e.Op is Opcode.Read or Opcode.Write);
        Assert.Contains(submitted, e => e.Op == Opcode.WriteFixed);
        Assert.Contains(submitted, e => e.Op == Opcode.ReadFixed && e.File == zeros && e.Length == 32768);
    }
}
