using System.Runtime.InteropServices;
using UblkSharp.Interop;
using UblkSharp.Interop.IoUring;
using UblkSharp.Ublk;

namespace UblkSharp.Targets.Cow;

/// <summary>
/// A <see cref="CowTarget"/>'s IO on one queue's io_uring, many requests in flight, nothing
/// blocking the queue thread:
/// <list type="bullet">
/// <item>a read takes each run of sectors from where its bits say (the COW file's data area or
/// the backing file), up to <see cref="RunsInFlight"/> runs at once, the rest of a run read again
/// after a short read and zeros past the end of a file (as <see cref="CowStorage.ReadFull"/>);</item>
/// <item>a write goes to the COW file, after a fallocate of each chunk of it that is not yet
/// allocated (see <see cref="CowAllocationMap"/>); its bits are set in memory once the data is written, as
/// the synchronous path sets them (so a bit never reaches the file before its data: see
/// <see cref="CowTarget"/>);</item>
/// <item>discard and write-zeroes punch or zero the range in the data area, then set its bits;</item>
/// <item>a flush (and a FUA write, after its data) persists the bitmap in the target's order:
/// take and copy the dirty pages, fdatasync, write the copies, fdatasync. One persister at a time
/// (the target's token): a flush that finds this queue persisting waits for that round and then
/// looks again; one that finds another holder (another queue, the writeback thread) polls on the
/// ring every <see cref="RetryInterval"/>. A flush whose writes are already durable ends at once.</item>
/// </list>
/// Under zero copy the request's pages are a slot of the ring's buffer table: reads and writes
/// are READ_FIXED/WRITE_FIXED on it, and zeros past the end of a file are a READ_FIXED from
/// /dev/zero, so the daemon never touches the bytes.
/// Steps: the step number's low byte is the kind, the rest a slot (a run) or a batch index.
/// </summary>
internal sealed unsafe class CowUringBackend : UringBackend
{
    /// <summary>Runs of one read in flight at once: enough to overlap the two files, few enough that a fragmented read cannot flood the ring.</summary>
    public const int RunsInFlight = 4;

    public static readonly TimeSpan RetryInterval = TimeSpan.FromMicroseconds(200);

    private const int CowFile = FirstFixedFile;
    private const int BackingFile = FirstFixedFile + 1;
    private const int ZeroFile = FirstFixedFile + 2;
    private const int MaxRetries = 1000;

    private const uint StepRead = 1;
    private const uint StepWrite = 2;
    private const uint StepZero = 3;
    private const uint StepRetry = 4;
    private const uint StepSyncData = 5;
    private const uint StepBitmapWrite = 6;
    private const uint StepSyncAll = 7;
    private const uint StepAllocate = 8;

    private readonly CowTarget _target;
    private readonly CowBitmap _bitmap;
    private readonly int[] _files;
    private readonly int _sectorShift;
    private readonly int _sectorSize;
    private readonly long _dataOffset;
    private readonly long _bitmapOffset;
    private Work[] _work = [];
    private Run[] _runs = [];
    private KernelTimespec* _retry;
    private int _zeroFd;

    // The persist this queue runs (it holds the target's token while _persistTag >= 0), and the
    // flushes on this queue that wait for it to end.
    private int _persistTag = -1;
    private long _persistCovered;
    private int _persistCursor;
    private int _persistPages;
    private int _persistPending;
    private int _persistError;
    private int _persistRetries;
    private int[] _waiters = [];
    private int[] _spareWaiters = [];
    private int _waiterCount;

    public CowUringBackend(CowTarget target, int cowFd, int backingFd)
    {
        _target = target;
        _bitmap = target.Bitmap;
        // /dev/zero: the zeros a zero-copy read past the end of a file gets (READ_FIXED from it).
        _zeroFd = Libc.open("/dev/zero", Libc.O_RDONLY | Libc.O_CLOEXEC, 0);
        if (_zeroFd < 0)
        {
            throw new ErrnoException(Marshal.GetLastPInvokeError(), "opening /dev/zero");
        }
        _files = [cowFd, backingFd, _zeroFd];
        _sectorShift = target.SectorShift;
        _sectorSize = 1 << _sectorShift;
        _dataOffset = target.DataOffset;
        _bitmapOffset = target.Header.BitmapOffset;
        _retry = (KernelTimespec*)NativeMemory.Alloc((nuint)sizeof(KernelTimespec));
        *_retry = KernelTimespec.From(RetryInterval);
    }

    public override IReadOnlyList<int> Files => _files;

    public override bool RunsSteps => true;

    public override void Prepare(ref Sqe sqe, in BackendRequest request) => throw new NotSupportedException("the cow backend runs its own steps");

    /// <summary>What one tag's request has got to.</summary>
    private struct Work
    {
        public IoOp Op;
        public bool Fua;
        public bool MayUnmap;
        public long Offset;
        public long Length;
        /// <summary>The request's data: an address, or under zero copy the offset into buffer slot <see cref="Fixed"/>.</summary>
        public byte* Buffer;
        public int Fixed;
        /// <summary>READ: the next sector to plan a run for. WRITE: bytes written.</summary>
        public long Next;
        public int Pending;
        public int Error;
        public int Retries;
        /// <summary>A flush's (or FUA write's) goal: this many completed write-like operations durable.</summary>
        public long Goal;
        /// <summary>WRITE: the chunks of the data area being allocated before it (device offsets).</summary>
        public long AllocStart;
        public long AllocCount;
    }

    /// <summary>A run of a read in flight: what is left of it.</summary>
    private struct Run
    {
        public long FileOffset;
        public int BufferOffset;
        public int Length;
        public bool InCow;
        /// <summary>Past the end of its file: zeros, from /dev/zero (zero copy only).</summary>
        public bool Zeros;
    }

    private static uint Step(uint kind, int index = 0) => kind | ((uint)index << 8);

    private ref Work WorkOf(int tag)
    {
        if (tag >= _work.Length)
        {
            // Grows while the queue warms up (tags appear as the depth is used), then never again.
            var n = Math.Max(tag + 1, Math.Max(16, _work.Length * 2));
            Array.Resize(ref _work, n);
            Array.Resize(ref _runs, n * RunsInFlight);
        }
        return ref _work[tag];
    }

    public override int Start(IBackendRing ring, int tag, in BackendRequest request)
    {
        ref var w = ref WorkOf(tag);
        w = default;
        w.Op = request.Op;
        w.Fua = request.IsFua;
        w.MayUnmap = (request.Flags & IoFlags.NoUnmap) == 0;
        w.Offset = request.Offset;
        w.Length = request.Length;
        w.Buffer = request.Buffer;
        w.Fixed = request.FixedBuffer;
        switch (request.Op)
        {
            case IoOp.Read:
                return StartRead(ring, tag, ref w);
            case IoOp.Write:
                {
                    var check = CheckWrite(w.Offset, w.Length);
                    if (check != 0)
                    {
                        return check;
                    }
                    if (_target.Allocation is { } map && map.NeedsAllocation(w.Offset, w.Length, out w.AllocStart, out w.AllocCount))
                    {
                        // The chunk first, so the write lands in allocated space (see CowAllocationMap).
                        ref var sqe = ref ring.GetSqe(tag, Step(StepAllocate), out var ud);
                        sqe.PrepareFallocate(CowFile, FallocateMode.KeepSize, (ulong)(_dataOffset + w.AllocStart), (ulong)w.AllocCount, ud);
                        sqe.flags |= SqeFlags.FixedFile;
                        return Pending;
                    }
                    SubmitWrite(ring, tag, ref w);
                    return Pending;
                }
            case IoOp.Discard:
            case IoOp.WriteZeroes:
                {
                    var check = CheckWrite(w.Offset, w.Length);
                    if (check != 0)
                    {
                        return check;
                    }
                    _target.Allocation?.Forget(w.Offset, w.Length);
                    SubmitZero(ring, tag, ref w, w.MayUnmap ? FallocateMode.PunchHole : FallocateMode.ZeroRange);
                    return Pending;
                }
            case IoOp.Flush:
                if (_target.IsReadOnly)
                {
                    return 0;
                }
                w.Goal = _target.CompletedCount;
                return TryFlush(ring, tag, ref w);
            default:
                return -Errno.EOPNOTSUPP;
        }
    }

    private int CheckWrite(long offset, long length)
    {
        if (_target.IsReadOnly)
        {
            return -Errno.EROFS;
        }
        if (offset < 0 || length < 0 || offset + length > _target.Size)
        {
            return -Errno.EINVAL;
        }
        // A partial sector whose bit is clear would need the rest of it from the backing file.
        return ((offset | length) & (_sectorSize - 1)) != 0 ? -Errno.EINVAL : 0;
    }

    public override void OnStep(IBackendRing ring, int tag, uint stepId, int res)
    {
        ref var w = ref _work[tag];
        switch (stepId & 0xff)
        {
            case StepRead:
                OnRead(ring, tag, ref w, (int)(stepId >> 8), res);
                break;
            case StepWrite:
                OnWrite(ring, tag, ref w, res);
                break;
            case StepZero:
                OnZero(ring, tag, ref w, res);
                break;
            case StepAllocate:
                _target.Allocated(w.AllocStart, w.AllocCount, res);
                SubmitWrite(ring, tag, ref w);
                break;
            case StepRetry:
                {
                    var r = TryFlush(ring, tag, ref w);
                    if (r != Pending)
                    {
                        ring.Complete(tag, r);
                    }
                    break;
                }
            case StepSyncData:
                OnSyncData(ring, res);
                break;
            case StepBitmapWrite:
                OnBitmapWrite(ring, (int)(stepId >> 8), res);
                break;
            case StepSyncAll:
                OnSyncAll(ring, res);
                break;
            default:
                throw new InvalidOperationException($"cow: unknown step {stepId}");
        }
    }

    private static bool Transient(int res) => res is -Errno.EAGAIN or -Errno.EINTR;

    // --- reads -----------------------------------------------------------------------------

    private int StartRead(IBackendRing ring, int tag, ref Work w)
    {
        if (w.Offset < 0 || w.Length < 0 || w.Offset + w.Length > _target.Size)
        {
            return -Errno.EINVAL;
        }
        if (w.Length == 0)
        {
            return 0;
        }
        w.Next = w.Offset >> _sectorShift;
        for (var slot = 0; slot < RunsInFlight && PlanRun(ring, tag, ref w, slot); slot++)
        {
        }
        return Pending;
    }

    private long EndSector(in Work w) => (w.Offset + w.Length + _sectorSize - 1) >> _sectorShift;

    /// <summary>Plans the next run of the read into <paramref name="slot"/> and submits it; false when the read has no more.</summary>
    private bool PlanRun(IBackendRing ring, int tag, ref Work w, int slot)
    {
        var end = EndSector(w);
        if (w.Next >= end)
        {
            return false;
        }
        var runEnd = _bitmap.RunEnd(w.Next, end, out var inCow);
        var from = Math.Max(w.Next << _sectorShift, w.Offset);
        var to = Math.Min(runEnd << _sectorShift, w.Offset + w.Length);
        ref var run = ref _runs[(tag * RunsInFlight) + slot];
        run.InCow = inCow;
        run.FileOffset = inCow ? _dataOffset + from : from;
        run.BufferOffset = (int)(from - w.Offset);
        run.Length = (int)(to - from);
        run.Zeros = false;
        w.Next = runEnd;
        SubmitRun(ring, tag, ref w, slot, ref run);
        return true;
    }

    private static void SubmitRun(IBackendRing ring, int tag, ref Work w, int slot, ref Run run)
    {
        ref var sqe = ref ring.GetSqe(tag, Step(StepRead, slot), out var ud);
        var file = run.Zeros ? ZeroFile : run.InCow ? CowFile : BackingFile;
        if (w.Fixed >= 0)
        {
            sqe.PrepareReadFixed(file, w.Buffer + run.BufferOffset, (uint)run.Length, run.Zeros ? 0 : (ulong)run.FileOffset, (ushort)w.Fixed, ud);
        }
        else
        {
            sqe.PrepareRead(file, w.Buffer + run.BufferOffset, (uint)run.Length, (ulong)run.FileOffset, ud);
        }
        sqe.flags |= SqeFlags.FixedFile;
        w.Pending++;
    }

    private void OnRead(IBackendRing ring, int tag, ref Work w, int slot, int res)
    {
        w.Pending--;
        ref var run = ref _runs[(tag * RunsInFlight) + slot];
        if (res < 0 && Transient(res) && ++w.Retries <= MaxRetries)
        {
            SubmitRun(ring, tag, ref w, slot, ref run);
            return;
        }
        if (res < 0)
        {
            w.Error = w.Error != 0 ? w.Error : (Transient(res) ? -Errno.EIO : res);
        }
        else if (res == 0)
        {
            // Past the end of the file: zeros, as UML reads it; under zero copy from /dev/zero,
            // which has no end (a 0 from it is an error).
            if (w.Fixed < 0)
            {
                new Span<byte>(w.Buffer + run.BufferOffset, run.Length).Clear();
            }
            else if (!run.Zeros)
            {
                run.Zeros = true;
                SubmitRun(ring, tag, ref w, slot, ref run);
                return;
            }
            else
            {
                w.Error = w.Error != 0 ? w.Error : -Errno.EIO;
            }
        }
        else if (res < run.Length)
        {
            run.FileOffset += res;
            run.BufferOffset += res;
            run.Length -= res;
            SubmitRun(ring, tag, ref w, slot, ref run);
            return;
        }
        if (w.Error == 0 && PlanRun(ring, tag, ref w, slot))
        {
            return;
        }
        if (w.Pending == 0)
        {
            ring.Complete(tag, w.Error != 0 ? w.Error : (int)w.Length);
        }
    }

    // --- writes, discard, write-zeroes -----------------------------------------------------

    private void SubmitWrite(IBackendRing ring, int tag, ref Work w)
    {
        ref var sqe = ref ring.GetSqe(tag, Step(StepWrite), out var ud);
        if (w.Fixed >= 0)
        {
            sqe.PrepareWriteFixed(CowFile, w.Buffer + w.Next, (uint)(w.Length - w.Next), (ulong)(_dataOffset + w.Offset + w.Next), (ushort)w.Fixed, ud);
        }
        else
        {
            sqe.PrepareWrite(CowFile, w.Buffer + w.Next, (uint)(w.Length - w.Next), (ulong)(_dataOffset + w.Offset + w.Next), ud);
        }
        sqe.flags |= SqeFlags.FixedFile;
    }

    private void OnWrite(IBackendRing ring, int tag, ref Work w, int res)
    {
        if (res < 0 && Transient(res) && ++w.Retries <= MaxRetries)
        {
            SubmitWrite(ring, tag, ref w);
            return;
        }
        if (res <= 0)
        {
            ring.Complete(tag, res == 0 || Transient(res) ? -Errno.EIO : res);
            return;
        }
        w.Next += res;
        if (w.Next < w.Length)
        {
            SubmitWrite(ring, tag, ref w);
            return;
        }
        // The data is written: only now may its bits be set.
        var count = _target.Completed(w.Offset, w.Length);
        if (!w.Fua)
        {
            ring.Complete(tag, (int)w.Length);
            return;
        }
        w.Goal = count;
        var r = TryFlush(ring, tag, ref w);
        if (r != Pending)
        {
            ring.Complete(tag, r);
        }
    }

    private void SubmitZero(IBackendRing ring, int tag, ref Work w, FallocateMode mode)
    {
        ref var sqe = ref ring.GetSqe(tag, Step(StepZero), out var ud);
        sqe.PrepareFallocate(CowFile, mode | FallocateMode.KeepSize, (ulong)(_dataOffset + w.Offset), (ulong)w.Length, ud);
        sqe.flags |= SqeFlags.FixedFile;
    }

    private void OnZero(IBackendRing ring, int tag, ref Work w, int res)
    {
        if (res == -Errno.EOPNOTSUPP && !w.MayUnmap && w.Next == 0)
        {
            // No ZERO_RANGE here: a hole reads as zeros as well (as the synchronous path does).
            w.Next = 1;
            SubmitZero(ring, tag, ref w, FallocateMode.PunchHole);
            return;
        }
        if (res < 0)
        {
            // EOPNOTSUPP: the runtime falls back to the target's synchronous WriteZeroes (writes of zeros).
            ring.Complete(tag, res == -Errno.ENODEV ? -Errno.EOPNOTSUPP : res);
            return;
        }
        _target.Completed(w.Offset, w.Length);
        ring.Complete(tag, 0);
    }

    // --- flush: the bitmap persisted in the target's order -----------------------------------

    /// <summary>The result of a flush (or FUA write) that is done: 0, or the write's length.</summary>
    private static int Done(in Work w) => w.Op == IoOp.Write ? (int)w.Length : 0;

    /// <summary>Ends the flush now (its goal is durable), joins or starts a persist, or polls for the token.</summary>
    private int TryFlush(IBackendRing ring, int tag, ref Work w)
    {
        if (_target.IsDurable(w.Goal))
        {
            return Done(w);
        }
        if (_persistTag >= 0)
        {
            // This queue's persist may have copied the pages before this flush's writes set their
            // bits: look again once it ends.
            AddWaiter(tag);
            return Pending;
        }
        if (!_target.TryBeginPersist())
        {
            ref var sqe = ref ring.GetSqe(tag, Step(StepRetry), out var ud);
            sqe.PrepareTimeout(_retry, 0, TimeoutFlags.None, ud);
            return Pending;
        }
        _persistTag = tag;
        _persistCovered = _target.CompletedCount;
        _persistCursor = 0;
        _persistError = 0;
        NextBatch(ring);
        return Pending;
    }

    private void AddWaiter(int tag)
    {
        if (_waiterCount == _waiters.Length)
        {
            Array.Resize(ref _waiters, Math.Max(16, _waiters.Length * 2));
        }
        _waiters[_waiterCount++] = tag;
    }

    /// <summary>Takes and copies the next batch of dirty pages and syncs the data under their bits; after the last, the final sync.</summary>
    private void NextBatch(IBackendRing ring)
    {
        var pages = _target.PersistPages;
        var scratch = _target.PersistScratch;
        while (_persistCursor < _bitmap.DirtyWords)
        {
            var n = _bitmap.TakeDirty(pages, ref _persistCursor);
            if (n == 0)
            {
                continue;
            }
            for (var i = 0; i < n; i++)
            {
                _bitmap.CopyPage(pages[i], new Span<byte>(scratch + ((long)i * CowBitmap.PageBytes), CowBitmap.PageBytes));
            }
            _persistPages = n;
            // Every bit in the copies has its data written: this sync makes that data durable
            // before any copy reaches the file.
            SubmitSync(ring, StepSyncData);
            return;
        }
        SubmitSync(ring, StepSyncAll);
    }

    private void SubmitSync(IBackendRing ring, uint kind)
    {
        ref var sqe = ref ring.GetSqe(_persistTag, Step(kind), out var ud);
        sqe.PrepareFsync(CowFile, FsyncFlags.DataSync, ud);
        sqe.flags |= SqeFlags.FixedFile;
    }

    private void OnSyncData(IBackendRing ring, int res)
    {
        if (res < 0)
        {
            FailBatch(ring, res);
            return;
        }
        // A write per run of consecutive pages (TakeDirty lists them in order).
        _persistPending = 0;
        _persistRetries = 0;
        var pages = _target.PersistPages;
        for (var i = 0; i < _persistPages;)
        {
            var j = i + 1;
            while (j < _persistPages && pages[j] == pages[j - 1] + 1)
            {
                j++;
            }
            SubmitBitmapWrite(ring, i, j - i);
            i = j;
        }
    }

    private void SubmitBitmapWrite(IBackendRing ring, int first, int count)
    {
        var pages = _target.PersistPages;
        var last = pages[first + count - 1];
        var bytes = ((count - 1) * CowBitmap.PageBytes) + _bitmap.PageLength(last);
        ref var sqe = ref ring.GetSqe(_persistTag, Step(StepBitmapWrite, first), out var ud);
        sqe.PrepareWrite(CowFile, _target.PersistScratch + ((long)first * CowBitmap.PageBytes), (uint)bytes,
            (ulong)(_bitmapOffset + ((long)pages[first] * CowBitmap.PageBytes)), ud);
        sqe.flags |= SqeFlags.FixedFile;
        _persistPending++;
    }

    private void OnBitmapWrite(IBackendRing ring, int first, int res)
    {
        _persistPending--;
        var pages = _target.PersistPages;
        var count = 1;
        while (first + count < _persistPages && pages[first + count] == pages[first + count - 1] + 1)
        {
            count++;
        }
        var bytes = ((count - 1) * CowBitmap.PageBytes) + _bitmap.PageLength(pages[first + count - 1]);
        if (((res >= 0 && res < bytes) || Transient(res)) && ++_persistRetries <= MaxRetries)
        {
            // Short: the same bytes again (rewriting what landed changes nothing).
            SubmitBitmapWrite(ring, first, count);
            return;
        }
        if (res < 0 || res < bytes)
        {
            _persistError = _persistError != 0 ? _persistError : (res < 0 && !Transient(res) ? res : -Errno.EIO);
        }
        if (_persistPending > 0)
        {
            return;
        }
        if (_persistError != 0)
        {
            FailBatch(ring, _persistError);
            return;
        }
        var scratch = _target.PersistScratch;
        for (var i = 0; i < _persistPages; i++)
        {
            _bitmap.MarkPersisted(pages[i], new ReadOnlySpan<byte>(scratch + ((long)i * CowBitmap.PageBytes), CowBitmap.PageBytes));
        }
        NextBatch(ring);
    }

    private void FailBatch(IBackendRing ring, int res)
    {
        // The pages go back to dirty: the next flush writes them, and reports whatever fails then.
        var pages = _target.PersistPages;
        for (var i = 0; i < _persistPages; i++)
        {
            _bitmap.MarkDirty(pages[i]);
        }
        EndPersist(ring, res);
    }

    private void OnSyncAll(IBackendRing ring, int res)
    {
        if (res >= 0)
        {
            _target.MarkDurable(_persistCovered);
        }
        EndPersist(ring, res < 0 ? res : 0);
    }

    private void EndPersist(IBackendRing ring, int res)
    {
        var tag = _persistTag;
        _persistTag = -1;
        _persistPages = 0;
        _target.EndPersist();
        ref var w = ref _work[tag];
        ring.Complete(tag, res < 0 ? res : Done(w));
        // The waiters look again: done now, or a persist of their own (the first one starts it,
        // the rest wait for that).
        // They may wait again (for a persist one of them starts): into the other list.
        var waiters = _waiters;
        var n = _waiterCount;
        (_waiters, _spareWaiters) = (_spareWaiters, waiters);
        _waiterCount = 0;
        for (var i = 0; i < n; i++)
        {
            var waiter = waiters[i];
            var r = TryFlush(ring, waiter, ref _work[waiter]);
            if (r != Pending)
            {
                ring.Complete(waiter, r);
            }
        }
    }

    protected override void Dispose(bool disposing)
    {
        if (_retry != null)
        {
            NativeMemory.Free(_retry);
            _retry = null;
        }
        if (_zeroFd >= 0)
        {
            Libc.close(_zeroFd);
            _zeroFd = -1;
        }
        base.Dispose(disposing);
    }
}
