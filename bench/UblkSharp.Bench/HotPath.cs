using System.Runtime.InteropServices;
using BenchmarkDotNet.Attributes;
using UblkSharp.Interop;
using UblkSharp.Interop.IoUring;
using UblkSharp.Targets;
using UblkSharp.Ublk;

namespace UblkSharp.Bench;

/// <summary>
/// BenchmarkDotNet micro-benchmarks of what a queue thread does per IO, on the host's real
/// io_uring (the host has no ublk driver, so the ublk commands go to /dev/null, which fails them
/// at once with EOPNOTSUPP: the SQE is built, submitted and reaped exactly as for the driver).
/// Every figure is per IO; the allocation column must read 0 bytes (the bar).
/// </summary>
[MemoryDiagnoser]
[System.Diagnostics.CodeAnalysis.SuppressMessage("Design", "CA1001", Justification = "BenchmarkDotNet's [GlobalCleanup] disposes them")]
public unsafe class HotPath
{
    /// <summary>IOs per invocation: a batch, as a busy queue sees them.</summary>
    public const int Batch = 32;
    private const int Block = 4096;
    private const long FileSize = 64L << 20;

    private Ring _ring = null!;
    private int _nullFd = -1;
    private int _fileFd = -1;
    private byte* _buffers;
    private LoopTarget _loop = null!;
    private UringBackend _backend = null!;
    private MemoryTarget _mem = null!;
    private NullTarget _null = null!;
    private ulong _rng = 0x9e3779b97f4a7c15ul;
    private Runtime.BatchIo _batch = null!;

    /// <summary>The tmpfs file the loop benchmark reads (created once, 64 MiB of random bytes).</summary>
    public static string DataPath { get; set; } = "/dev/shm/ublksharp-bench-micro.dat";

    [GlobalSetup]
    public void Setup()
    {
        Program.EnsureDataFile(DataPath, FileSize);
        _ring = Ring.Create(new RingOptions { Entries = Batch * 2, CompletionEntries = Batch * 4, SingleIssuer = true, DeferTaskrun = true });
        _nullFd = Libc.OpenOrThrow("/dev/null", Libc.O_RDWR);
        // The ring path is what this cycle measures (on tmpfs the loop target would otherwise serve synchronously).
        _loop = new LoopTarget(DataPath, io: LoopIo.Ring);
        _backend = _loop.CreateUringBackend(0)!;
        // Fixed file 0 stands for the ublk char device, the loop target's file follows, as in UblkQueue.
        _ring.RegisterFiles([_nullFd, .. _backend.Files]);
        _fileFd = _backend.Files[0];
        _buffers = (byte*)NativeMemory.AlignedAlloc(Batch * Block, 4096);
        _mem = new MemoryTarget(FileSize);
        _null = new NullTarget(FileSize);
        new Span<byte>(_buffers, Batch * Block).Fill(0x5a);
        // Zero copy: the tags' buffers as slots of the ring's table (here our own memory, so the
        // address is a real one; under ublk the driver installs the request's pages there).
        var slots = new Iovec[Batch];
        for (var i = 0; i < Batch; i++)
        {
            slots[i] = new Iovec { iov_base = _buffers + (i * Block), iov_len = Block };
        }
        _ring.RegisterBuffers(slots);
        // Batched commits, from BatchIo's pool of commit buffers (no PREP or fetch: only the commit is measured).
        _batch = new Runtime.BatchIo(_ring, 0, Batch, 1ul << 17, withAddress: true, autoBufReg: false);
    }

    [GlobalCleanup]
    public void Cleanup()
    {
        _batch.Dispose();
        _backend.Dispose();
        _loop.Dispose();
        _mem.Dispose();
        _null.Dispose();
        _ring.Dispose();
        _ = Libc.close(_nullFd);
        NativeMemory.AlignedFree(_buffers);
    }

    /// <summary>The ring alone: an SQE prepared, submitted and its CQE reaped.</summary>
    [Benchmark(OperationsPerInvoke = Batch)]
    public int RingNop()
    {
        for (var i = 0; i < Batch; i++)
        {
            _ring.GetSqe().PrepareNop((ulong)i);
        }
        return Reap();
    }

    /// <summary>
    /// The ring work of one loop-target 4k read: the backend's read SQE (fixed file), its
    /// completion, then the COMMIT_AND_FETCH_REQ uring_cmd, as UblkQueue issues them.
    /// </summary>
    [Benchmark(OperationsPerInvoke = Batch, Baseline = true)]
    public int LoopRead4kCycle()
    {
        var n = ReadBatch(zeroCopy: false);
        for (var i = 0; i < Batch; i++)
        {
            var cmd = new IoCmd { q_id = 0, tag = (ushort)i, result = Block, addr = (ulong)(_buffers + (i * Block)) };
            _ring.PrepareUringCmd(0, UblkCommands.CommitAndFetchReq, cmd, (ulong)i).flags |= SqeFlags.FixedFile;
        }
        return n + Reap();
    }

    /// <summary>
    /// The same cycle with the live figures a queue keeps (UblkQueue: a timestamp when the request
    /// arrives, the counts and the latency bucket at its commit): its ratio to the cycle above is
    /// what the metrics cost.
    /// </summary>
    [Benchmark(OperationsPerInvoke = Batch)]
    public int LoopRead4kCycleWithFigures()
    {
        var blocks = (ulong)(FileSize / Block);
        for (var i = 0; i < Batch; i++)
        {
            _starts[i] = System.Diagnostics.Stopwatch.GetTimestamp();
            ref var sqe = ref _ring.GetSqe();
            _backend.Prepare(ref sqe, new BackendRequest(IoOp.Read, 0, (long)NextOffset(blocks), Block, _buffers + (i * Block)));
            sqe.user_data = (1ul << 16) | (ulong)i;
        }
        var n = Reap();
        for (var i = 0; i < Batch; i++)
        {
            _stats.Completed(IoOp.Read, Block, _starts[i]);
            var cmd = new IoCmd { q_id = 0, tag = (ushort)i, result = Block, addr = (ulong)(_buffers + (i * Block)) };
            _ring.PrepareUringCmd(0, UblkCommands.CommitAndFetchReq, cmd, (ulong)i).flags |= SqeFlags.FixedFile;
        }
        return n + Reap();
    }

    /// <summary>
    /// The zero-copy cycle (AUTO_BUF_REG): the backend's READ_FIXED on the tag's slot, then the
    /// COMMIT_AND_FETCH_REQ with addr 0 and the slot in the SQE's addr, as UblkQueue issues them.
    /// </summary>
    [Benchmark(OperationsPerInvoke = Batch)]
    public int LoopRead4kCycleZeroCopy()
    {
        var n = ReadBatch(zeroCopy: true);
        for (var i = 0; i < Batch; i++)
        {
            var cmd = new IoCmd { q_id = 0, tag = (ushort)i, result = Block, addr = 0 };
            ref var sqe = ref _ring.PrepareUringCmd(0, UblkCommands.CommitAndFetchReq, cmd, (ulong)i);
            sqe.addr = UblkCommands.AutoBufReg((ushort)i, UblkCommands.AutoBufRegFallback);
            sqe.flags |= SqeFlags.FixedFile;
        }
        return n + Reap();
    }

    /// <summary>
    /// The batched cycle (BATCH_IO): the backend's reads, then the whole batch's results as one
    /// COMMIT_IO_CMDS (BatchIo.Commit per tag, one Flush), as UblkQueue does once per pass of its loop.
    /// </summary>
    [Benchmark(OperationsPerInvoke = Batch)]
    public int LoopRead4kCycleBatched()
    {
        var n = ReadBatch(zeroCopy: false);
        for (var i = 0; i < Batch; i++)
        {
            _batch.Commit(i, Block, _buffers + (i * Block));
        }
        _batch.Flush();
        return n + ReapBatchCommands(1);
    }

    /// <summary>The backend's 4k reads for the batch (on each tag's slot under zero copy), submitted and reaped.</summary>
    private int ReadBatch(bool zeroCopy)
    {
        var blocks = (ulong)(FileSize / Block);
        for (var i = 0; i < Batch; i++)
        {
            ref var sqe = ref _ring.GetSqe();
            _backend.Prepare(ref sqe, new BackendRequest(IoOp.Read, 0, (long)NextOffset(blocks), Block, _buffers + (i * Block), zeroCopy ? i : BackendRequest.NoFixedBuffer));
            sqe.user_data = (1ul << 16) | (ulong)i;
        }
        return Reap();
    }

    /// <summary>Reaps <paramref name="count"/> batch command completions, freeing their commit buffers.</summary>
    private int ReapBatchCommands(int count)
    {
        _ring.SubmitAndWait((uint)count);
        var n = 0;
        while (n < count)
        {
            while (_ring.TryGetCompletion(out var cqe))
            {
                _batch.OnCommitted(cqe.user_data, cqe.res, out _, out _);
                n++;
            }
            if (n < count)
            {
                _ring.SubmitAndWait(1);
            }
        }
        return n;
    }

    private readonly UblkSharp.Runtime.Metrics.QueueStats _stats = new();
    private readonly long[] _starts = new long[Batch];

    /// <summary>The mem target's 4k read, called as the queue calls synchronous targets.</summary>
    [Benchmark(OperationsPerInvoke = Batch)]
    public int MemRead4k() => Sync(_mem, IoOp.Read);

    /// <summary>The mem target's 4k write.</summary>
    [Benchmark(OperationsPerInvoke = Batch)]
    public int MemWrite4k() => Sync(_mem, IoOp.Write);

    /// <summary>The null target's 4k read (no copy).</summary>
    [Benchmark(OperationsPerInvoke = Batch)]
    public int NullRead4k() => Sync(_null, IoOp.Read);

    private int Sync(BlockTarget target, IoOp op)
    {
        var blocks = (ulong)(FileSize / Block);
        var total = 0;
        for (var i = 0; i < Batch; i++)
        {
            var offset = (long)NextOffset(blocks);
            total += op == IoOp.Read
                ? target.Read(new Span<byte>(_buffers + (i * Block), Block), offset)
                : target.Write(new ReadOnlySpan<byte>(_buffers + (i * Block), Block), offset);
        }
        return total;
    }

    private int Reap()
    {
        _ring.SubmitAndWait(Batch);
        var n = 0;
        while (n < Batch)
        {
            while (_ring.TryGetCompletion(out _))
            {
                n++;
            }
            if (n < Batch)
            {
                _ring.SubmitAndWait(1);
            }
        }
        return n;
    }

    private ulong NextOffset(ulong blocks)
    {
        _rng ^= _rng << 13;
        _rng ^= _rng >> 7;
        _rng ^= _rng << 17;
        return _rng % blocks * Block;
    }
}
