using System.Diagnostics;
using System.Runtime.InteropServices;
using Microsoft.Extensions.Logging;
using UblkSharp.Interop;
using UblkSharp.Interop.IoUring;
using UblkSharp.Targets;
using UblkSharp.Ublk;

namespace UblkSharp.Runtime;

/// <summary>
/// One ublk hardware queue: a dedicated OS thread that owns the queue's io_uring (the 6.12 driver
/// rejects commands from any other thread), its mmapped descriptor array and a buffer per tag.
/// Backend IO goes on the same ring. Every request is committed exactly once, with its full
/// length or an error; a short or retried backend step only ever resubmits the remainder.
/// </summary>
internal sealed unsafe class UblkQueue : IDisposable, IBackendRing
{
    // user_data: tag in bits 0-15, kind in bits 16-19.
    private const ulong KindCommand = 0;
    private const ulong KindBackend = 1ul << 16;
    private const ulong KindDelay = 2ul << 16;
    private const ulong KindIgnore = 3ul << 16;
    private const ulong KindNotify = 4ul << 16;
    // A step of a backend that runs its own (RunsSteps); the step's number in bits 32-63.
    private const ulong KindStep = 5ul << 16;
    private const ulong KindReapAgain = 6ul << 16;
    private const ulong KindStop = 7ul << 16;
    // SUPPORT_ZERO_COPY's REGISTER_IO_BUF and UNREGISTER_IO_BUF of a request's pages.
    private const ulong KindRegister = 8ul << 16;
    private const ulong KindUnregister = 9ul << 16;
    private const ulong KindMask = 15ul << 16;
    private const int ReapBatch = 32;

    private readonly int _queueId;
    private readonly int _depth;
    private readonly int _maxIo;
    private readonly int _charFd;
    private readonly BlockTarget _target;
    private readonly bool _userCopy;
    // AUTO_BUF_REG: the driver installs each request's pages at slot `tag` of the ring's sparse
    // buffer table before handing it over, and takes them out at its commit; the backend's READ/WRITE
    // use that slot. A request it could not install comes flagged NEED_REG_BUF and is copied (USER_COPY).
    private readonly bool _zeroCopy;
    // SUPPORT_ZERO_COPY (6.15+) instead: the queue registers each request's pages at slot `tag`
    // itself (REGISTER_IO_BUF) before its backend IO and takes them out (UNREGISTER_IO_BUF) before
    // its commit. A request whose registration fails is copied (USER_COPY).
    private readonly bool _explicitZeroCopy;
    private long _unregisterFailures;
    // BATCH_IO: fetches and commits go in batches (see BatchIo) instead of a command per request.
    private readonly bool _batch;
    private BatchIo? _batchIo;
    private readonly IUserCopyTarget? _direct;
    private readonly int _blockSize;
    private readonly int[]? _cpus;
    private readonly Action<Exception> _onFatal;
    private readonly ILogger _logger;
    private readonly Thread _thread;
    private readonly ManualResetEventSlim _ready = new();
    private Exception? _setupError;
    // Wakes the thread from outside (a READ on it is always pending) to end now (a failed recovery
    // leaves the device quiesced, so no STOP_DEV aborts the fetches) or once the requests it holds
    // are answered (after QUIESCE_DEV); closing the ring cancels the fetches and lets go of /dev/ublkcN.
    private readonly int _stopFd;
    private ulong* _stopBuffer;
    private bool _stopping;
    private volatile bool _stopRequested;
    private volatile bool _endRequested;
    // A hand-over to another daemon on a kernel without QUIESCE_DEV (6.12, recovery reissue): no new
    // request is served (those that arrive are left unanswered), the ones being served are answered,
    // and then the thread parks with its ring open until the process exits. The exit is what makes
    // the kernel requeue the requests left (USER_RECOVERY_REISSUE) and quiesce the device: closing
    // the rings while the process lives left a request in flight for good in testing, and
    // quiesce_work waits for it with the device's mutex held.
    private volatile bool _handOverRequested;
    private bool _handingOver;
    private readonly ManualResetEventSlim _parked = new();
    // No request comes any more (an ABORT arrived, or the owner quiesced the device): the thread
    // ends once it holds none. Not every tag gets an ABORT: QUIESCE_DEV aborts only the fetches
    // parked at that instant (ublk_cancel_dev skips a tag the daemon holds or one being dispatched),
    // and the COMMIT_AND_FETCH of a request answered later stays parked until the ring closes.
    private bool _ending;
    private bool _endingAnnounced;
    private int _busyTags;

    private Ring? _ring;
    private MappedMemory? _descMap;
    private MappedMemory? _buffers;
    private IoDesc* _descs;
    private TagState[] _tags = [];
    private KernelTimespec* _delays;
    private UringBackend? _backend;
    private bool _steps;
    // The target's reads are zeros (null): served from the tag's buffer, kept zeroed (ZeroRead).
    private bool _readsZeros;
    private ResultFilter? _filter;
    private int _backendInFlight;
    // Backends that complete outside the ring (librbd): the fd read on the ring, its 8-byte buffer
    // (owned here, since the READ stays pending until the ring is gone) and the reap batch.
    private int _completionFd = -1;
    private ulong* _notifyBuffer;
    private int[] _reapTags = [];
    private int[] _reapResults = [];
    private bool _reapAgainPending;

    public UblkQueue(int queueId, int depth, int maxIo, int charFd, BlockTarget target, bool userCopy, bool zeroCopy, bool explicitZeroCopy, bool batch, int[]? cpus, Action<Exception> onFatal, ILogger logger)
    {
        _userCopy = userCopy;
        _zeroCopy = zeroCopy;
        _explicitZeroCopy = zeroCopy && explicitZeroCopy;
        _batch = batch;
        _direct = userCopy && !zeroCopy ? target as IUserCopyTarget : null;
        _queueId = queueId;
        _depth = depth;
        _maxIo = maxIo;
        _charFd = charFd;
        _target = target;
        _blockSize = target.LogicalBlockSize;
        _cpus = cpus;
        _onFatal = onFatal;
        _logger = logger;
        _thread = new Thread(Run) { IsBackground = true, Name = $"ublk-q{queueId}" };
        _stopFd = Libc.eventfd(0, Libc.EFD_CLOEXEC);
        if (_stopFd < 0)
        {
            throw new ErrnoException(Marshal.GetLastPInvokeError(), "eventfd");
        }
    }

    public int QueueId => _queueId;

    /// <summary>Requests, bytes, errors and latencies, by operation (written by the queue thread alone).</summary>
    public Metrics.QueueStats Stats { get; } = new();

    /// <summary>Requests the queue holds now (read from any thread: a moment's view).</summary>
    public int BusyTags => Volatile.Read(ref _busyTags);

    /// <summary>Requests committed with an error.</summary>
    public long Errors { get; private set; }

    /// <summary>Requests committed.</summary>
    public long Completed { get; private set; }

    /// <summary>Reads and writes served by zero copy (the request's pages in the ring's buffer table).</summary>
    public long ZeroCopyRequests { get; private set; }

    /// <summary>Reads and writes of a zero-copy device whose buffer the driver could not install (NEED_REG_BUF), served by copying.</summary>
    public long ZeroCopyFallbacks { get; private set; }

    /// <summary>Commits the driver refused in a COMMIT_IO_CMDS (BATCH_IO); 0 unless something is wrong.</summary>
    public long BatchCommitFailures => _batchIo?.CommitFailures ?? 0;

    /// <summary>Backend steps retried (short, EAGAIN).</summary>
    public long Retries { get; private set; }

    /// <summary>Exceptions thrown by the target (each failed its request with EIO, or, from Reap, named none).</summary>
    public long TargetExceptions { get; private set; }

    /// <summary>
    /// Commits refused because the tag had no request (it would have been a second commit), and
    /// completions a backend reaped for a tag it was not serving. Always 0 unless the runtime or a
    /// backend is wrong; tests read it.
    /// </summary>
    public long ExactlyOnceViolations { get; private set; }

    /// <summary>
    /// Bytes the queue thread allocated after its first <see cref="WarmUpRequests"/> requests (JIT
    /// and tiering allocate while warming up). The hot path must keep this at 0.
    /// </summary>
    public long SteadyStateAllocatedBytes { get; private set; }

    public const int WarmUpRequests = 2000;

    private long _allocationBaseline = -1;

    /// <summary>Starts the thread; returns once every tag is fetched (or throws what set-up hit).</summary>
    public void Start(TimeSpan timeout)
    {
        _thread.Start();
        if (!_ready.Wait(timeout))
        {
            throw new TimeoutException($"queue {_queueId} did not set up within {timeout.TotalSeconds} s");
        }
        if (_setupError is not null)
        {
            throw new IOException($"queue {_queueId}: {_setupError.Message}", _setupError);
        }
    }

    /// <summary>
    /// Waits for the thread to end, which it does once the device is stopped or quiesced (an ABORT,
    /// or <see cref="RequestEnd"/>) and no request is left in it.
    /// </summary>
    public bool Join(TimeSpan timeout) => _thread.ThreadState == System.Threading.ThreadState.Unstarted || _thread.Join(timeout);

    /// <summary>
    /// Makes the thread end now, whatever the device's state; it closes its ring on the way out,
    /// which cancels its fetches. For a queue whose device will not be stopped (a failed recovery).
    /// </summary>
    public void RequestStop()
    {
        _stopRequested = true;
        Wake();
    }

    /// <summary>
    /// The device was quiesced (QUIESCE_DEV returned): no request comes any more, but a queue may
    /// get no ABORT at all (a depth-1 queue whose one tag the daemon held). The thread answers the
    /// requests it holds, then ends.
    /// </summary>
    public void RequestEnd()
    {
        _endRequested = true;
        Wake();
    }

    /// <summary>
    /// Hands the queue's requests over to the next daemon (see <c>UblkDevice.HandOver</c>): requests
    /// that arrive from now on are left for it, the ones in service are answered, then the thread
    /// parks (<see cref="WaitParked"/>) until the process exits.
    /// </summary>
    public void RequestHandOver()
    {
        _handOverRequested = true;
        Wake();
    }

    /// <summary>Requests that arrived during a hand-over and were left to the next daemon.</summary>
    public long LeftForNextDaemon { get; private set; }

    /// <summary>Waits until a hand-over's requests in service are answered and the thread parked.</summary>
    public bool WaitParked(TimeSpan timeout) => _parked.Wait(timeout);

    private void Wake()
    {
        var one = 1ul;
        _ = Libc.write(_stopFd, &one, sizeof(ulong));
    }

    private void Run()
    {
        var serving = false;
        try
        {
            try
            {
                SetUp();
            }
            catch (Exception e)
            {
                _setupError = e;
                return;
            }
            serving = true;
            _ready.Set();
            Serve();
        }
        catch (Exception e)
        {
            // A queue that stops serving while the process lives hangs the device's IO forever:
            // hand the failure to the owner, whose default is to end the process.
            if (serving)
            {
                _onFatal(e);
            }
        }
        finally
        {
            _ready.Set();
            TearDown();
        }
    }

    private void SetUp()
    {
        if (_cpus is { Length: > 0 })
        {
            // The queue's CPUs, within what this process may use (taskset, cpusets): never widen it.
            Span<byte> allowed = stackalloc byte[512];
            Span<byte> mask = stackalloc byte[512];
            fixed (byte* a = allowed)
            {
                if (Libc.sched_getaffinity(0, (nuint)allowed.Length, a) < 0)
                {
                    allowed.Fill(0xff);
                }
            }
            var any = false;
            foreach (var cpu in _cpus)
            {
                if (cpu < mask.Length * 8 && (allowed[cpu / 8] & (1 << (cpu % 8))) != 0)
                {
                    mask[cpu / 8] |= (byte)(1 << (cpu % 8));
                    any = true;
                }
            }
            if (any)
            {
                fixed (byte* m = mask)
                {
                    _ = Libc.sched_setaffinity(0, (nuint)mask.Length, m); // best effort
                }
            }
        }
        // The ring is created on this thread: SINGLE_ISSUER ties it to its creator.
        _ring = Ring.Create(new RingOptions
        {
            Entries = (uint)(_depth * 2),
            CompletionEntries = (uint)(_depth * 4),
            SingleIssuer = true,
            DeferTaskrun = true,
        });
        _backend = _target.CreateUringBackend(_queueId);
        if (_zeroCopy)
        {
            // Its IO must be on this ring: the slots are this ring's (a completion fd means another thread's).
            if (_backend is null || _backend.CompletionFd >= 0)
            {
                throw new InvalidOperationException($"the device uses zero copy, but the {_target.Kind} target's backend does not do its IO on the queue's ring");
            }
            // Before the first FETCH: the driver installs a request's pages at its slot when it hands it over.
            _ring.RegisterSparseBuffers((uint)_depth);
        }
        Span<int> files = stackalloc int[1 + (_backend?.Files.Count ?? 0)];
        files[0] = _charFd;
        for (var i = 1; i < files.Length; i++)
        {
            files[i] = _backend!.Files[i - 1];
        }
        _ring.RegisterFiles(files);

        _descMap = MappedMemory.Map(_charFd, UblkCommands.DescriptorOffset(_queueId), (nuint)UblkCommands.DescriptorLength(_depth),
            Libc.PROT_READ, Libc.MAP_SHARED | Libc.MAP_POPULATE, $"ublk queue {_queueId} descriptors");
        _descs = (IoDesc*)_descMap.Pointer;
        _buffers = MappedMemory.MapAnonymous((nuint)((long)_depth * _maxIo), $"ublk queue {_queueId} buffers");
        _tags = new TagState[_depth];
        // One per tag, and one more (at _depth) for retrying a backend's Reap that threw.
        _delays = (KernelTimespec*)NativeMemory.AllocZeroed((nuint)((_depth + 1) * sizeof(KernelTimespec)));
        _filter = _target.CreateResultFilter(_queueId);
        _completionFd = _backend?.CompletionFd ?? -1;
        _steps = _backend?.RunsSteps ?? false;
        _readsZeros = _target.ReadsZeros && _backend is null && _filter is null && _direct is null;
        if (_completionFd >= 0)
        {
            _notifyBuffer = (ulong*)NativeMemory.AllocZeroed(sizeof(ulong));
            _reapTags = new int[ReapBatch];
            _reapResults = new int[ReapBatch];
            ArmNotification();
        }

        _stopBuffer = (ulong*)NativeMemory.AllocZeroed(sizeof(ulong));
        ArmStop();

        for (var tag = 0; tag < _depth; tag++)
        {
            _tags[tag].Buffer = _buffers.Pointer + ((long)tag * _maxIo);
        }
        if (_batch)
        {
            _batchIo = new BatchIo(_ring, _queueId, _depth, KindCommand, withAddress: !_userCopy && !_zeroCopy, autoBufReg: _zeroCopy && !_explicitZeroCopy);
            var buffers = new byte*[_depth];
            for (var tag = 0; tag < _depth; tag++)
            {
                buffers[tag] = _tags[tag].Buffer;
            }
            _batchIo.Start(buffers);
        }
        else
        {
            for (var tag = 0; tag < _depth; tag++)
            {
                QueueCommand(UblkCommands.FetchReq, tag, 0);
            }
        }
        _ring.Submit();
    }

    private void ArmStop() => _ring!.GetSqe().PrepareRead(_stopFd, _stopBuffer, sizeof(ulong), 0, KindStop);

    private void Serve()
    {
        var ring = _ring!;
        var wait = 1u;
        while (true)
        {
            // A COMMIT_IO_CMDS completes at once (the driver takes it at submission): waiting for
            // one completion would return for it alone and cost a second enter per request at qd1,
            // so the wait counts it on top of the one event waited for.
            var commitSent = _batchIo?.Flush() == true;
            ring.SubmitAndWait(wait == 0 ? 0 : commitSent ? wait + 1 : wait);
            var handled = 0;
            if (_allocationBaseline >= 0)
            {
                SteadyStateAllocatedBytes = GC.GetAllocatedBytesForCurrentThread() - _allocationBaseline;
            }
            else if (Completed >= WarmUpRequests)
            {
                _allocationBaseline = GC.GetAllocatedBytesForCurrentThread();
            }
            // Completions are read in place and the CQ head released once per batch (liburing's
            // io_uring_for_each_cqe), not once per completion; what handling them submits may add more.
            uint ready;
            while ((ready = ring.PeekCompletions()) > 0)
            {
                for (var i = 0u; i < ready; i++)
                {
                    ref readonly var cqe = ref ring.CompletionAt(i);
                    handled++;
                    OnCompletion(cqe.user_data, cqe.res, cqe.flags);
                }
                ring.AdvanceCompletions(ready);
            }
            if (_stopping)
            {
                return;
            }
            if (!_ending || _busyTags > 0)
            {
                wait = 1;
                continue;
            }
            if (!_endingAnnounced)
            {
                _endingAnnounced = true;
                AnnounceEnding();
            }
            if (_backendInFlight > 0)
            {
                wait = 1;
                continue;
            }
            // Idle: one more enter without waiting submits the commits just queued (a request
            // committed is no longer the daemon's, so the ring's close cannot fail it) and runs the
            // task work that may still hand over a request dispatched before the quiesce.
            if (wait == 0 && handled == 0)
            {
                if (_handingOver)
                {
                    _parked.Set();
                    Thread.Sleep(Timeout.Infinite); // until the process exits; see _handOverRequested
                }
                return;
            }
            wait = 0;
        }
    }

    private void OnCompletion(ulong userData, int res, uint flags)
    {
        var tag = (int)(userData & 0xffff);
        switch (userData & KindMask)
        {
            case KindCommand when (userData & BatchIo.SubMask) != 0:
                OnBatchCommand(userData, res, flags);
                break;
            case KindCommand:
                OnCommand(tag, res);
                break;
            case KindBackend:
                _backendInFlight--;
                if (Progress(ref _tags[tag], tag, res))
                {
                    StartBackend(tag);
                }
                break;
            case KindDelay:
                _backendInFlight--;
                StartBackend(tag);
                break;
            case KindNotify:
                OnNotification(res);
                break;
            case KindStep:
                _backendInFlight--;
                OnStep(tag, (uint)(userData >> 32), res);
                break;
            case KindReapAgain:
                _backendInFlight--;
                _reapAgainPending = false;
                ReapAll();
                break;
            case KindRegister:
                _backendInFlight--;
                OnRegistered(tag, res);
                break;
            case KindUnregister:
                _backendInFlight--;
                OnUnregistered(tag, res);
                break;
            case KindStop:
                if (_stopRequested)
                {
                    _stopping = true;
                }
                else
                {
                    _handingOver |= _handOverRequested;
                    _ending |= _endRequested || _handingOver;
                    ArmStop(); // a later RequestStop must still wake the thread
                }
                break;
            default:
                _backendInFlight--;
                break;
        }
    }

    /// <summary>A backend that keeps work of its own pending (a socket receive) is told to let it go.</summary>
    private void AnnounceEnding()
    {
        if (!_steps)
        {
            return;
        }
        try
        {
            _backend!.OnQueueEnding(this);
        }
        catch (Exception e) when (e is not OutOfMemoryException)
        {
            if (++TargetExceptions <= 10)
            {
                RuntimeLog.TargetThrewEnding(_logger, _queueId, e);
            }
        }
    }

    private void OnCommand(int tag, int res)
    {
        if (res == UblkCommands.IoResAbort)
        {
            // The device is stopping or quiesced: the queue gets no more requests (the kernel sets
            // ->canceling before it aborts any fetch), though other tags may get no ABORT.
            _ending = true;
            return;
        }
        if (res != 0)
        {
            throw new ErrnoException(-res, $"ublk IO command (queue {_queueId}, tag {tag})");
        }
        if (_handingOver)
        {
            LeftForNextDaemon++;
            return;
        }
        ref var t = ref _tags[tag];
        var desc = _descs[tag];
        t.Op = desc.Op;
        t.Flags = desc.Flags;
        t.Offset = (long)desc.start_sector << 9;
        var length = (long)desc.nr_sectors << 9;
        t.Progress = new RequestProgress(t.Op switch { IoOp.Read => StepKind.Read, IoOp.Write => StepKind.Write, _ => StepKind.Other }, length);
        if (t.Op == IoOp.Write && length > t.DirtyBytes)
        {
            // Marked before anything can fail it: the driver (or USER_COPY below) puts its data here.
            t.DirtyBytes = Math.Min(length, _maxIo);
        }
        t.InRequest = 0;
        t.InBackend = false;
        t.ZeroCopy = false;
        if (_zeroCopy && !_explicitZeroCopy && t.Op is IoOp.Read or IoOp.Write)
        {
            if ((t.Flags & IoFlags.NeedRegBuf) == 0)
            {
                t.ZeroCopy = true;
                ZeroCopyRequests++;
            }
            else
            {
                ZeroCopyFallbacks++;
            }
        }
        Debug.Assert(!t.Busy, "the driver handed a busy tag a new request");
        t.Busy = true;
        _busyTags++;
        t.StartTicks = Stopwatch.GetTimestamp();
        if (t.Op is not (IoOp.Read or IoOp.Write or IoOp.Flush or IoOp.Discard or IoOp.WriteZeroes))
        {
            Commit(tag, -Errno.EOPNOTSUPP);
            return;
        }
        if (t.Op is IoOp.Read or IoOp.Write && t.Length > _maxIo)
        {
            Commit(tag, -Errno.EINVAL);
            return;
        }
        if (_explicitZeroCopy && t.Op is IoOp.Read or IoOp.Write)
        {
            // Served once its pages are at slot `tag` (OnRegistered).
            QueueBufferCommand(UblkCommands.RegisterIoBuf, tag, KindRegister);
            return;
        }
        ServeRequest(tag);
    }

    /// <summary>REGISTER_IO_BUF or UNREGISTER_IO_BUF of the tag's request at its slot in this ring's buffer table.</summary>
    private void QueueBufferCommand(uint op, int tag, ulong kind)
    {
        var cmd = new IoCmd { q_id = (ushort)_queueId, tag = (ushort)tag, addr = (ulong)tag };
        ref var sqe = ref _ring!.PrepareUringCmd(0, op, cmd, kind | (uint)tag);
        sqe.flags |= SqeFlags.FixedFile;
        _backendInFlight++;
    }

    /// <summary>The request's pages are registered (zero copy), or could not be (copied instead).</summary>
    private void OnRegistered(int tag, int res)
    {
        ref var t = ref _tags[tag];
        if (res == 0)
        {
            t.ZeroCopy = true;
            t.Registered = true;
            ZeroCopyRequests++;
        }
        else
        {
            ZeroCopyFallbacks++;
        }
        ServeRequest(tag);
    }

    /// <summary>A request's pages are out of the buffer table: it can be committed now.</summary>
    private void OnUnregistered(int tag, int res)
    {
        ref var t = ref _tags[tag];
        t.Registered = false;
        var result = t.Result;
        if (res < 0)
        {
            // Never expected (the slot is ours alone): said, and the request fails rather than
            // claim data that may not have moved.
            if (++_unregisterFailures <= 10)
            {
                RuntimeLog.IoFailed(_logger, _queueId, t.Op, t.Length, t.Offset, $"UNREGISTER_IO_BUF: {Errno.Describe(res)}");
            }
            result = -Errno.EIO;
        }
        Commit(tag, result);
    }

    /// <summary>Serves a request that arrived (and, under explicit zero copy, has its pages registered or not).</summary>
    private void ServeRequest(int tag)
    {
        ref var t = ref _tags[tag];
        if (t.Op is IoOp.Read or IoOp.Write && !t.ZeroCopy)
        {
            if (_userCopy && !TakeRequestData(ref t, tag))
            {
                return;
            }
            if (!_userCopy && _zeroCopy)
            {
                // Its buffer is not installed and the driver copies nothing: no way to reach its bytes.
                Commit(tag, -Errno.EIO);
                return;
            }
        }
        if (_filter is not null)
        {
            TimeSpan delay;
            try
            {
                delay = _filter.DrawDelay();
            }
            catch (Exception e) when (e is not OutOfMemoryException)
            {
                TargetThrew("drawing a delay", ref t, e);
                Commit(tag, -Errno.EIO);
                return;
            }
            if (delay > TimeSpan.Zero)
            {
                _delays[tag] = KernelTimespec.From(delay);
                _ring!.GetSqe().PrepareTimeout(&_delays[tag], 0, TimeoutFlags.None, KindDelay | (ulong)tag);
                _backendInFlight++;
                return;
            }
        }
        StartBackend(tag);
    }

    /// <summary>A batch command completed: a fetch's tags are served as FETCH completions are; a commit's buffer is free again.</summary>
    private void OnBatchCommand(ulong userData, int res, uint flags)
    {
        var batch = _batchIo!;
        if ((userData & BatchIo.SubMask) != BatchIo.SubFetch)
        {
            batch.OnCommitted(userData, res, out var taken, out var count);
            if (taken == count)
            {
                return;
            }
            if ((userData & BatchIo.SubMask) == BatchIo.SubPrep)
            {
                throw new ErrnoException(res < 0 ? -res : Errno.EINVAL, $"ublk PREP_IO_CMDS (queue {_queueId})");
            }
            // Never expected (the driver refuses only a tag it does not hand us): said, counted, and
            // those requests stay unanswered rather than be committed twice.
            if (batch.CommitFailures <= 10)
            {
                RuntimeLog.BatchCommitRefused(_logger, _queueId, taken, count, res < 0 ? Errno.Describe(res) : $"{res} bytes");
            }
            return;
        }
        var armed = batch.OnFetched(userData, res, flags, out var tags);
        foreach (var tag in tags)
        {
            if (tag >= _depth)
            {
                if (++ExactlyOnceViolations <= 10)
                {
                    RuntimeLog.StrayCompletion(_logger, _queueId, tag);
                }
                continue;
            }
            OnCommand(tag, 0);
        }
        if (!armed)
        {
            if (res != UblkCommands.IoResAbort)
            {
                throw new ErrnoException(-res, $"ublk FETCH_IO_CMDS (queue {_queueId})");
            }
            // The device is stopping or quiesced: no request comes any more.
            _ending = true;
        }
    }

    /// <summary>What is left of a request, for its backend: under zero copy slot <paramref name="tag"/> with the offset into it, else the tag's buffer.</summary>
    private static BackendRequest BackendRequestOf(ref TagState t, int tag) => t.ZeroCopy
        ? new BackendRequest(t.Op, t.Flags, t.Offset + t.Done, t.Remaining, (byte*)t.Done, tag)
        : new BackendRequest(t.Op, t.Flags, t.Offset + t.Done, t.Remaining, t.Buffer + t.Done);

    private void ArmNotification()
        => _ring!.GetSqe().PrepareRead(_completionFd, _notifyBuffer, sizeof(ulong), 0, KindNotify);

    /// <summary>The completion fd was readable: takes every finished request, then reads it again.</summary>
    private void OnNotification(int res)
    {
        if (res < 0 && res is not (-Errno.EINTR or -Errno.EAGAIN))
        {
            throw new ErrnoException(-res, $"reading the backend's completion fd (queue {_queueId})");
        }
        // Re-armed first: a completion that lands while this drains makes the new READ finish at
        // once, so none is missed.
        ArmNotification();
        ReapAll();
    }

    private void ReapAll()
    {
        int n;
        do
        {
            try
            {
                n = Math.Clamp(_backend!.Reap(_reapTags, _reapResults), 0, ReapBatch);
            }
            catch (Exception e) when (e is not OutOfMemoryException)
            {
                // Reap names no request, and what it had in flight may still be writing into the
                // tags' buffers, so nothing can be failed safely here. What it still holds is
                // asked for again shortly (a timeout on the ring: the queue thread never sleeps),
                // and on every wake-up of the completion fd.
                if (++TargetExceptions <= 10)
                {
                    RuntimeLog.ReapFailed(_logger, _queueId, e);
                }
                if (!_reapAgainPending)
                {
                    _reapAgainPending = true;
                    _delays[_depth] = KernelTimespec.From(TimeSpan.FromMilliseconds(10));
                    _ring!.GetSqe().PrepareTimeout(&_delays[_depth], 0, TimeoutFlags.None, KindReapAgain);
                    _backendInFlight++;
                }
                return;
            }
            for (var i = 0; i < n; i++)
            {
                var tag = _reapTags[i];
                if ((uint)tag >= (uint)_depth || !_tags[tag].InBackend)
                {
                    // Never a second commit for a request already answered, nor one for a tag the backend does not hold.
                    if (++ExactlyOnceViolations <= 10)
                    {
                        RuntimeLog.StrayCompletion(_logger, _queueId, tag);
                    }
                    continue;
                }
                _tags[tag].InBackend = false;
                _backendInFlight--;
                if (Progress(ref _tags[tag], tag, _reapResults[i]))
                {
                    StartBackend(tag);
                }
            }
        }
        while (n == ReapBatch);
    }

    /// <summary>
    /// Under USER_COPY: a target that moves the data itself serves the whole request here; otherwise
    /// a WRITE's data is read into the tag's buffer first. False when the request is already committed.
    /// </summary>
    private bool TakeRequestData(ref TagState t, int tag)
    {
        if (_direct is not null)
        {
            var position = UblkCommands.UserCopyOffset(_queueId, tag);
            int r;
            try
            {
                r = t.Op == IoOp.Read
                    ? _direct.ReadToRequest(_charFd, position, t.Offset, (int)t.Length)
                    : _direct.WriteFromRequest(_charFd, position, t.Offset, (int)t.Length, (t.Flags & IoFlags.Fua) != 0);
            }
            catch (Exception e) when (e is not OutOfMemoryException)
            {
                TargetThrew("copying", ref t, e);
                Commit(tag, -Errno.EIO);
                return false;
            }
            if (r != IUserCopyTarget.NotDirect)
            {
                t.InRequest = t.Length;
                Commit(tag, (int)t.Length);
                return false;
            }
        }
        if (t.Op == IoOp.Write)
        {
            var r = CopyRequest(tag, t.Buffer, 0, (int)t.Length, toRequest: false);
            if (r < 0)
            {
                Commit(tag, r);
                return false;
            }
        }
        return true;
    }

    /// <summary>
    /// Moves bytes [<paramref name="from"/>, + <paramref name="length"/>) of a request between the tag's
    /// buffer and the request itself (USER_COPY); 0 or a negative errno.
    /// </summary>
    private int CopyRequest(int tag, byte* buffer, int from, int length, bool toRequest)
    {
        var position = UblkCommands.UserCopyOffset(_queueId, tag) + from;
        buffer += from;
        var done = 0;
        while (done < length)
        {
            var n = toRequest
                ? Libc.pwrite(_charFd, buffer + done, (nuint)(length - done), position + done)
                : Libc.pread(_charFd, buffer + done, (nuint)(length - done), position + done);
            if (n < 0)
            {
                var errno = Marshal.GetLastPInvokeError();
                if (errno == Errno.EINTR)
                {
                    continue;
                }
                return -errno;
            }
            if (n == 0)
            {
                return -Errno.EIO;
            }
            done += (int)n;
        }
        return 0;
    }

    /// <summary>Starts (or continues) the backend work for a tag: on the ring, or synchronously here.</summary>
    private void StartBackend(int tag)
    {
        ref var t = ref _tags[tag];
        if (_completionFd >= 0)
        {
            // The backend's own submission; its completion comes back through the fd on the ring.
            do
            {
                int r;
                try
                {
                    r = _backend!.Submit(tag, new BackendRequest(t.Op, t.Flags, t.Offset + t.Done, t.Remaining, t.Buffer + t.Done));
                }
                catch (Exception e) when (e is not OutOfMemoryException)
                {
                    TargetThrew("submitting", ref t, e);
                    r = -Errno.EIO;
                }
                if (r >= 0)
                {
                    t.InBackend = true;
                    _backendInFlight++;
                    return;
                }
                if (!Progress(ref t, tag, r))
                {
                    return;
                }
            }
            while (true);
        }
        if (_steps)
        {
            do
            {
                int r;
                try
                {
                    r = _backend!.Start(this, tag, BackendRequestOf(ref t, tag));
                }
                catch (Exception e) when (e is not OutOfMemoryException)
                {
                    TargetThrew("starting", ref t, e);
                    r = -Errno.EIO;
                }
                if (r == UringBackend.Pending || !Progress(ref t, tag, r))
                {
                    return;
                }
            }
            while (true);
        }
        if (_backend is not null)
        {
            ref var sqe = ref _ring!.GetSqe();
            try
            {
                _backend.Prepare(ref sqe, BackendRequestOf(ref t, tag));
            }
            catch (Exception e) when (e is not OutOfMemoryException)
            {
                // The SQE is already taken: make it a harmless NOP that fails this one request.
                sqe = default;
                sqe.PrepareNop(0);
                TargetThrew("preparing", ref t, e);
                sqe.user_data = KindIgnore | (ulong)tag;
                _backendInFlight++;
                Commit(tag, -Errno.EIO);
                return;
            }
            sqe.user_data = KindBackend | (ulong)tag;
            _backendInFlight++;
            return;
        }
        // Synchronous targets: loop here rather than recurse, however short the steps are.
        while (Progress(ref t, tag, ExecuteSync(ref t)))
        {
        }
    }

    private int ExecuteSync(ref TagState t)
    {
        try
        {
            return t.Op switch
            {
                IoOp.Read when _readsZeros => ZeroRead(ref t),
                IoOp.Read => _target.Read(new Span<byte>(t.Buffer + t.Done, (int)t.Remaining), t.Offset + t.Done),
                IoOp.Write when (t.Flags & IoFlags.Fua) != 0 => _target.WriteFua(new ReadOnlySpan<byte>(t.Buffer + t.Done, (int)t.Remaining), t.Offset + t.Done),
                IoOp.Write => _target.Write(new ReadOnlySpan<byte>(t.Buffer + t.Done, (int)t.Remaining), t.Offset + t.Done),
                IoOp.Flush => _target.Flush(),
                IoOp.Discard => _target.Discard(t.Offset, t.Length),
                IoOp.WriteZeroes => _target.WriteZeroes(t.Offset, t.Length, (t.Flags & IoFlags.NoUnmap) == 0),
                _ => -Errno.EOPNOTSUPP,
            };
        }
        catch (ErrnoException e)
        {
            return -e.Errno;
        }
        catch (Exception e) when (e is not OutOfMemoryException)
        {
            TargetThrew("serving", ref t, e);
            return -Errno.EIO;
        }
    }

    /// <summary>A read of a target that reads zeros: the buffer is cleared only where a WRITE left bytes.</summary>
    private static int ZeroRead(ref TagState t)
    {
        if (t.DirtyBytes > 0)
        {
            new Span<byte>(t.Buffer, (int)t.DirtyBytes).Clear();
            t.DirtyBytes = 0;
        }
        return (int)t.Remaining;
    }

    /// <summary>A step backend's completion; a throw there fails that one request (a target's bug, counted).</summary>
    private void OnStep(int tag, uint stepId, int res)
    {
        try
        {
            _backend!.OnStep(this, tag, stepId, res);
        }
        catch (Exception e) when (e is not OutOfMemoryException)
        {
            if (tag >= _depth)
            {
                // A step of the backend's own (IBackendRing.NoTag): no request to fail.
                if (++TargetExceptions <= 10)
                {
                    RuntimeLog.OwnStepThrew(_logger, _queueId, e);
                }
                return;
            }
            TargetThrew("completing a step of", ref _tags[tag], e);
            if (_tags[tag].Busy)
            {
                ((IBackendRing)this).Complete(tag, -Errno.EIO);
            }
        }
    }

    /// <summary>A target's bug fails one request, not the device: it is said and counted.</summary>
    private void TargetThrew(string doing, ref TagState t, Exception e)
    {
        if (++TargetExceptions <= 10)
        {
            RuntimeLog.TargetThrew(_logger, _queueId, doing, t.Op, t.Offset, e);
        }
    }

    /// <summary>
    /// Accounts one backend step (the one policy, <see cref="RequestProgress"/>). Returns true when
    /// the remainder must be started again; otherwise the request has been committed.
    /// </summary>
    private bool Progress(ref TagState t, int tag, int res)
    {
        if (_filter is not null)
        {
            try
            {
                res = _filter.Apply(res, t.Op is IoOp.Read or IoOp.Write, _blockSize);
            }
            catch (Exception e) when (e is not OutOfMemoryException)
            {
                TargetThrew("filtering", ref t, e);
                res = -Errno.EIO;
            }
        }
        if (res == -Errno.EOPNOTSUPP && _backend is not null && t.Op is IoOp.WriteZeroes or IoOp.Discard)
        {
            // The backing file system lacks this fallocate mode: the target's own method fills in.
            res = ExecuteSync(ref t);
        }
        if (t.Progress.Next(res, out var error))
        {
            Retries++;
            Stats.Retried();
            return true;
        }
        if (error == 0 && t.Progress.ZeroRest)
        {
            // Past the end of a shorter backing file: the rest reads as zeros.
            new Span<byte>(t.Buffer + t.Done, (int)t.Remaining).Clear();
            if (t.ZeroCopy)
            {
                // The request's pages are not ours to write: the zeros go in through USER_COPY.
                error = _userCopy ? CopyRequest(tag, t.Buffer, (int)t.Done, (int)t.Remaining, toRequest: true) : -Errno.EIO;
            }
        }
        Commit(tag, error < 0 ? error : t.Op is IoOp.Read or IoOp.Write ? (int)t.Length : 0);
        return false;
    }

    private void Commit(int tag, int result)
    {
        ref var t = ref _tags[tag];
        if (t.Registered && t.Busy)
        {
            // Explicit zero copy: the pages leave the buffer table before the request completes.
            t.Result = result;
            QueueBufferCommand(UblkCommands.UnregisterIoBuf, tag, KindUnregister);
            return;
        }
        if (!t.Busy)
        {
            // A second commit for one request: the driver would take it for the tag's next request.
            Debug.Assert(t.Busy, $"queue {_queueId}: tag {tag} committed twice");
            if (++ExactlyOnceViolations <= 10)
            {
                RuntimeLog.CommittedTwice(_logger, _queueId, tag, t.Op, t.Offset);
            }
            return;
        }
        if (_userCopy && !t.ZeroCopy && t.Op == IoOp.Read && result > 0 && t.InRequest < result)
        {
            // The data is still in the tag's buffer: under USER_COPY the driver copies nothing.
            var r = CopyRequest(tag, t.Buffer, (int)t.InRequest, result - (int)t.InRequest, toRequest: true);
            if (r < 0)
            {
                result = r;
            }
        }
        t.Busy = false;
        _busyTags--;
        Completed++;
        Stats.Completed(t.Op, result, t.StartTicks);
        if (result < 0 && ++Errors <= 10)
        {
            // The first few failures say what failed; after that only the count grows.
            RuntimeLog.IoFailed(_logger, _queueId, t.Op, t.Length, t.Offset, Errno.Describe(result));
        }
        QueueCommand(UblkCommands.CommitAndFetchReq, tag, result);
    }

    ref Sqe IBackendRing.GetSqe(int tag, uint stepId, out ulong userData)
    {
        userData = KindStep | (ulong)tag | ((ulong)stepId << 32);
        _backendInFlight++;
        return ref _ring!.GetSqe();
    }

    void IBackendRing.Complete(int tag, int result)
    {
        if (Progress(ref _tags[tag], tag, result))
        {
            StartBackend(tag);
        }
    }

    private void QueueCommand(uint op, int tag, int result)
    {
        if (_batchIo is not null)
        {
            // Every tag was fetched by PREP_IO_CMDS: a commit goes with the pass's others (Serve flushes them).
            _batchIo.Commit(tag, result, _tags[tag].Buffer);
            return;
        }
        // Under USER_COPY and AUTO_BUF_REG the driver copies nothing, and the command's addr must be 0.
        var cmd = new IoCmd { q_id = (ushort)_queueId, tag = (ushort)tag, result = result, addr = _userCopy || _zeroCopy ? 0 : (ulong)_tags[tag].Buffer };
        ref var sqe = ref _ring!.PrepareUringCmd(0, op, cmd, KindCommand | (ulong)tag);
        if (_zeroCopy && !_explicitZeroCopy)
        {
            // The SQE's own addr (not the command's) says where the driver installs the next
            // request's pages: slot `tag`, with fallback to the copy path if it cannot.
            sqe.addr = UblkCommands.AutoBufReg((ushort)tag, UblkCommands.AutoBufRegFallback);
        }
        sqe.flags |= SqeFlags.FixedFile;
    }

    public void Dispose()
    {
        _ready.Dispose();
        _ = Libc.close(_stopFd);
    }

    private void TearDown()
    {
        // The ring first: closing it ends whatever SQEs are still pending, so none can write into
        // memory the backend frees (a socket receive's buffer) after this.
        _ring?.Dispose();
        try
        {
            _backend?.Dispose();
        }
        catch (Exception e) when (e is not OutOfMemoryException)
        {
            // The queue is going anyway; the rest below must still be released.
            RuntimeLog.BackendCloseFailed(_logger, _queueId, e);
        }
        _batchIo?.Dispose(); // its buffers were the kernel's to write until the ring closed
        _descMap?.Dispose();
        _buffers?.Dispose();
        if (_notifyBuffer != null)
        {
            NativeMemory.Free(_notifyBuffer); // the ring, and with it the pending READ, is gone
            _notifyBuffer = null;
        }
        if (_delays != null)
        {
            NativeMemory.Free(_delays);
            _delays = null;
        }
        if (_stopBuffer != null)
        {
            NativeMemory.Free(_stopBuffer); // as the notify buffer: its READ went with the ring
            _stopBuffer = null;
        }
    }
}
