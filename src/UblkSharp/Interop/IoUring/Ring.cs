using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;

namespace UblkSharp.Interop.IoUring;

/// <summary>
/// One io_uring instance, mapped and driven from managed code. Not thread-safe: a ring belongs to
/// one thread (the ublk driver insists on it for queue rings). The submit and reap paths allocate nothing.
/// </summary>
public sealed unsafe class Ring : IDisposable
{
    private int _fd;
    private readonly MappedMemory _sqRing;
    private readonly MappedMemory? _cqRing; // null when the kernel maps both rings at once (SINGLE_MMAP)
    private readonly MappedMemory _sqes;

    private readonly uint* _sqHead;
    private readonly uint* _sqTail;
    private readonly uint* _sqFlags;
    private readonly uint* _sqDropped;
    private readonly uint _sqMask;
    private readonly uint* _cqHead;
    private readonly uint* _cqTail;
    private readonly uint* _cqOverflow;
    private readonly uint _cqMask;
    private readonly byte* _cqes;
    private readonly byte* _sqeBase;
    private readonly int _sqeShift; // log2 of the SQE stride
    private readonly int _cqeShift; // log2 of the CQE stride

    private uint _sqeTail; // SQEs handed out, published to the kernel on submit

    private Ring(int fd, in IoUringParams p, SetupFlags flags)
    {
        _fd = fd;
        Flags = flags;
        Features = (RingFeatures)p.features;
        SqEntries = p.sq_entries;
        CqEntries = p.cq_entries;
        _sqeShift = flags.HasFlag(SetupFlags.Sqe128) ? 7 : 6;
        _cqeShift = flags.HasFlag(SetupFlags.Cqe32) ? 5 : 4;

        var sqSize = p.sq_off.array + (p.sq_entries * sizeof(uint));
        var cqSize = p.cq_off.cqes + (p.cq_entries << _cqeShift);
        const int prot = Libc.PROT_READ | Libc.PROT_WRITE;
        const int mapFlags = Libc.MAP_SHARED | Libc.MAP_POPULATE;
        try
        {
            if (Features.HasFlag(RingFeatures.SingleMmap))
            {
                _sqRing = MappedMemory.Map(fd, MmapOffsets.SqRing, Math.Max(sqSize, cqSize), prot, mapFlags, "io_uring rings");
            }
            else
            {
                _sqRing = MappedMemory.Map(fd, MmapOffsets.SqRing, sqSize, prot, mapFlags, "io_uring SQ ring");
                _cqRing = MappedMemory.Map(fd, MmapOffsets.CqRing, cqSize, prot, mapFlags, "io_uring CQ ring");
            }
            _sqes = MappedMemory.Map(fd, MmapOffsets.Sqes, p.sq_entries << _sqeShift, prot, mapFlags, "io_uring SQEs");
        }
        catch
        {
            _cqRing?.Dispose();
            _sqRing?.Dispose();
            throw;
        }

        var sq = _sqRing.Pointer;
        var cq = (_cqRing ?? _sqRing).Pointer;
        _sqHead = (uint*)(sq + p.sq_off.head);
        _sqTail = (uint*)(sq + p.sq_off.tail);
        _sqFlags = (uint*)(sq + p.sq_off.flags);
        _sqDropped = (uint*)(sq + p.sq_off.dropped);
        _sqMask = *(uint*)(sq + p.sq_off.ring_mask);
        _cqHead = (uint*)(cq + p.cq_off.head);
        _cqTail = (uint*)(cq + p.cq_off.tail);
        _cqOverflow = (uint*)(cq + p.cq_off.overflow);
        _cqMask = *(uint*)(cq + p.cq_off.ring_mask);
        _cqes = cq + p.cq_off.cqes;
        _sqeBase = _sqes.Pointer;

        // Identity-map the SQ index array once, as liburing does, so submit only moves the tail.
        var array = (uint*)(sq + p.sq_off.array);
        for (uint i = 0; i < p.sq_entries; i++)
        {
            array[i] = i;
        }
        _sqeTail = *_sqTail;
    }

    ~Ring() => Dispose();

    /// <summary>The ring's file descriptor (-1 once disposed).</summary>
    public int Fd => _fd;

    /// <summary>The setup flags the kernel accepted (refused optional ones are dropped).</summary>
    public SetupFlags Flags { get; }

    public RingFeatures Features { get; }

    public uint SqEntries { get; }

    public uint CqEntries { get; }

    /// <summary>Bytes available for a URING_CMD payload: 80 on an SQE128 ring, else 16.</summary>
    public int CmdCapacity => _sqeShift == 7 ? 80 : 16;

    /// <summary>SQEs prepared but not yet submitted.</summary>
    public uint Pending => _sqeTail - Volatile.Read(ref *_sqTail);

    /// <summary>Free SQ slots.</summary>
    public uint SqSpace => SqEntries - (_sqeTail - Volatile.Read(ref *_sqHead));

    /// <summary>Completions waiting to be reaped.</summary>
    public uint CqReady => Volatile.Read(ref *_cqTail) - *_cqHead;

    /// <summary>Completions the kernel dropped because the CQ was full (only without FEAT_NODROP).</summary>
    public uint CqOverflowCount => Volatile.Read(ref *_cqOverflow);

    /// <summary>Invalid SQEs the kernel skipped.</summary>
    public uint SqDropped => Volatile.Read(ref *_sqDropped);

    /// <summary>Whether the kernel holds completions that did not fit in the CQ (flushed by the next enter).</summary>
    public bool HasOverflowBacklog => (Volatile.Read(ref *_sqFlags) & SqRingFlags.CqOverflow) != 0;

    /// <summary>
    /// Creates a ring. Optional flags the kernel refuses (DEFER_TASKRUN, SINGLE_ISSUER, COOP_TASKRUN) are
    /// dropped one at a time; SQE128 and CQE32 are requirements and fail the call.
    /// </summary>
    public static Ring Create(RingOptions options)
    {
        ArgumentNullException.ThrowIfNull(options);
        if (options.Entries == 0)
        {
            throw new ArgumentOutOfRangeException(nameof(options), "Entries must be at least 1");
        }
        var flags = SetupFlags.None;
        if (options.Sqe128)
        {
            flags |= SetupFlags.Sqe128;
        }
        if (options.Cqe32)
        {
            flags |= SetupFlags.Cqe32;
        }
        if (options.CompletionEntries != 0)
        {
            flags |= SetupFlags.CqSize;
        }
        if (options.SingleIssuer)
        {
            flags |= SetupFlags.SingleIssuer;
        }
        if (options.CoopTaskrun)
        {
            flags |= SetupFlags.CoopTaskrun;
        }
        if (options.DeferTaskrun)
        {
            // The kernel requires SINGLE_ISSUER with DEFER_TASKRUN, and COOP_TASKRUN is implied.
            flags = (flags | SetupFlags.DeferTaskrun | SetupFlags.SingleIssuer) & ~SetupFlags.CoopTaskrun;
        }

        while (true)
        {
            var p = new IoUringParams { flags = (uint)flags, cq_entries = options.CompletionEntries };
            var fd = (int)Libc.syscall(Libc.SYS_io_uring_setup, options.Entries, (long)&p, 0, 0, 0, 0);
            if (fd >= 0)
            {
                try
                {
                    return new Ring(fd, p, flags);
                }
                catch
                {
                    _ = Libc.close(fd);
                    throw;
                }
            }
            var errno = Marshal.GetLastPInvokeError();
            if (errno == Errno.EINVAL && TryDropOptional(ref flags))
            {
                continue;
            }
            throw SetupError(errno, flags);
        }
    }

    // Old kernels reject newer flags with EINVAL; fall back to the next best setup.
    private static bool TryDropOptional(ref SetupFlags flags)
    {
        if (flags.HasFlag(SetupFlags.DeferTaskrun))
        {
            flags = (flags & ~SetupFlags.DeferTaskrun) | SetupFlags.CoopTaskrun;
            return true;
        }
        if (flags.HasFlag(SetupFlags.SingleIssuer))
        {
            flags &= ~SetupFlags.SingleIssuer;
            return true;
        }
        if (flags.HasFlag(SetupFlags.CoopTaskrun))
        {
            flags &= ~SetupFlags.CoopTaskrun;
            return true;
        }
        return false;
    }

    private static ErrnoException SetupError(int errno, SetupFlags flags)
    {
        string? hint = errno switch
        {
            Errno.ENOSYS => "This kernel has no io_uring (CONFIG_IO_URING is off, or seccomp blocks it)",
            Errno.EPERM => $"io_uring is disabled for this process: check the kernel.io_uring_disabled sysctl (now {ReadSysctl("kernel/io_uring_disabled")}) and the io_uring_group sysctl, or a seccomp filter",
            Errno.ENOMEM => "The kernel could not pin the ring memory: raise RLIMIT_MEMLOCK (ulimit -l) or free memory",
            Errno.EINVAL => $"The kernel refused the setup flags {flags}; SQE128 and CQE32 need Linux 5.19+",
            Errno.EMFILE or Errno.ENFILE => "Out of file descriptors: raise the open-file limit (ulimit -n)",
            _ => null,
        };
        return new ErrnoException(errno, "io_uring_setup", hint);
    }

    private static string ReadSysctl(string name)
    {
        try
        {
            return File.ReadAllText("/proc/sys/" + name).Trim();
        }
        catch (IOException)
        {
            return "unreadable";
        }
        catch (UnauthorizedAccessException)
        {
            return "unreadable";
        }
    }

    /// <summary>
    /// Takes the next free SQE, zeroed across the full stride. Returns false when the SQ is full
    /// (submit, then try again).
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public bool TryGetSqe(out Sqe* sqe)
    {
        var head = Volatile.Read(ref *_sqHead);
        if (_sqeTail - head >= SqEntries)
        {
            sqe = null;
            return false;
        }
        var p = _sqeBase + ((_sqeTail & _sqMask) << _sqeShift);
        Unsafe.InitBlockUnaligned(p, 0, 1u << _sqeShift);
        _sqeTail++;
        sqe = (Sqe*)p;
        return true;
    }

    /// <summary>Takes the next free SQE, submitting what is pending first if the SQ is full.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public ref Sqe GetSqe()
    {
        if (!TryGetSqe(out var sqe))
        {
            Submit();
            if (!TryGetSqe(out sqe))
            {
                throw new InvalidOperationException("io_uring SQ is full and the kernel took no entries; reap completions first");
            }
        }
        return ref *sqe;
    }

    /// <summary>Prepares a URING_CMD whose payload must fit this ring's command area.</summary>
    public ref Sqe PrepareUringCmd<T>(int fd, uint cmdOp, in T payload, ulong userData)
        where T : unmanaged
    {
        if (sizeof(T) > CmdCapacity)
        {
            throw new ArgumentException($"A {sizeof(T)}-byte URING_CMD payload does not fit this ring's {CmdCapacity}-byte command area (SQE128 gives 80)");
        }
        ref var sqe = ref GetSqe();
        sqe.PrepareUringCmdUnchecked(fd, cmdOp, payload, userData);
        return ref sqe;
    }

    /// <summary>Submits pending SQEs without waiting. Returns how many the kernel took.</summary>
    public int Submit() => Enter(0, null);

    /// <summary>Submits pending SQEs and waits until at least <paramref name="waitFor"/> completions are ready.</summary>
    public int SubmitAndWait(uint waitFor) => Enter(waitFor, null);

    /// <summary>
    /// Submits pending SQEs and waits for <paramref name="waitFor"/> completions or the timeout,
    /// whichever comes first (IORING_ENTER_EXT_ARG). Returns how many SQEs the kernel took.
    /// </summary>
    public int SubmitAndWait(uint waitFor, TimeSpan timeout)
    {
        var ts = KernelTimespec.From(timeout);
        return Enter(waitFor, &ts);
    }

    private int Enter(uint waitFor, KernelTimespec* timeout)
    {
        ObjectDisposedException.ThrowIf(_fd < 0, this);
        // Publish the new tail; release ordering makes the SQE contents visible first.
        var toSubmit = _sqeTail - Volatile.Read(ref *_sqHead);
        Volatile.Write(ref *_sqTail, _sqeTail);

        uint flags = 0;
        if (waitFor > 0 || HasOverflowBacklog || Flags.HasFlag(SetupFlags.DeferTaskrun))
        {
            // DEFER_TASKRUN rings only post completions when asked for events.
            flags |= EnterFlags.GetEvents;
        }
        GeteventsArg arg = default;
        long argp = 0, argsz = 0;
        if (timeout != null)
        {
            flags |= EnterFlags.ExtArg | EnterFlags.GetEvents;
            arg.ts = (ulong)timeout;
            argp = (long)&arg;
            argsz = sizeof(GeteventsArg);
        }
        if (toSubmit == 0 && flags == 0)
        {
            return 0;
        }

        while (true)
        {
            var r = Libc.syscall(Libc.SYS_io_uring_enter, _fd, toSubmit, waitFor, flags, argp, argsz);
            if (r >= 0)
            {
                return (int)r;
            }
            var errno = Marshal.GetLastPInvokeError();
            switch (errno)
            {
                case Errno.EINTR:
                    // .NET uses signals internally (GC suspension); just go again.
                    toSubmit = _sqeTail - Volatile.Read(ref *_sqHead);
                    continue;
                case Errno.ETIME:
                    return (int)(toSubmit - (_sqeTail - Volatile.Read(ref *_sqHead)));
                case Errno.EAGAIN:
                case Errno.EBUSY:
                    // The CQ is full (backpressure): the caller must reap before more can be submitted.
                    return (int)(toSubmit - (_sqeTail - Volatile.Read(ref *_sqHead)));
                default:
                    throw new ErrnoException(errno, "io_uring_enter");
            }
        }
    }

    /// <summary>Takes one completion if one is ready. Flushes the kernel's overflow backlog when the CQ runs dry.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public bool TryGetCompletion(out Cqe cqe)
    {
        var head = *_cqHead;
        if (head == Volatile.Read(ref *_cqTail))
        {
            if (!HasOverflowBacklog)
            {
                cqe = default;
                return false;
            }
            Enter(0, null);
            if (head == Volatile.Read(ref *_cqTail))
            {
                cqe = default;
                return false;
            }
        }
        cqe = *(Cqe*)(_cqes + ((head & _cqMask) << _cqeShift));
        // Release: the kernel may reuse the slot only after we have copied it.
        Volatile.Write(ref *_cqHead, head + 1);
        return true;
    }

    /// <summary>
    /// How many completions can be read in place with <see cref="CompletionAt"/> (liburing's
    /// io_uring_for_each_cqe); consume them with <see cref="AdvanceCompletions"/>, which releases the
    /// CQ head once per batch instead of once per completion. Flushes the overflow backlog when the CQ is dry.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public uint PeekCompletions()
    {
        var ready = Volatile.Read(ref *_cqTail) - *_cqHead;
        if (ready == 0 && HasOverflowBacklog)
        {
            Enter(0, null);
            ready = Volatile.Read(ref *_cqTail) - *_cqHead;
        }
        return ready;
    }

    /// <summary>The <paramref name="index"/>-th ready completion, in place; valid until <see cref="AdvanceCompletions"/>.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public ref readonly Cqe CompletionAt(uint index) => ref *(Cqe*)(_cqes + (((*_cqHead + index) & _cqMask) << _cqeShift));

    /// <summary>Consumes <paramref name="count"/> completions read with <see cref="CompletionAt"/>.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public void AdvanceCompletions(uint count) => Volatile.Write(ref *_cqHead, *_cqHead + count); // release: slots are reused only after we read them

    /// <summary>Copies up to <paramref name="destination"/>.Length completions and consumes them.</summary>
    public int GetCompletions(Span<Cqe> destination)
    {
        var head = *_cqHead;
        var ready = Volatile.Read(ref *_cqTail) - head;
        var n = (int)Math.Min(ready, (uint)destination.Length);
        for (var i = 0; i < n; i++)
        {
            destination[i] = *(Cqe*)(_cqes + (((head + (uint)i) & _cqMask) << _cqeShift));
        }
        Volatile.Write(ref *_cqHead, head + (uint)n);
        if (n < destination.Length && HasOverflowBacklog)
        {
            Enter(0, null);
            n += GetCompletions(destination[n..]);
        }
        return n;
    }

    /// <summary>The 16 extra bytes of a CQE32 completion at the head of the CQ, before it is consumed.</summary>
    public ReadOnlySpan<byte> PeekBigCqeExtra()
    {
        if (_cqeShift != 5)
        {
            throw new InvalidOperationException("This ring was not created with CQE32");
        }
        var head = *_cqHead;
        return head == Volatile.Read(ref *_cqTail)
            ? default
            : new ReadOnlySpan<byte>(_cqes + ((head & _cqMask) << _cqeShift) + sizeof(Cqe), 16);
    }

    /// <summary>Registers files for IOSQE_FIXED_FILE use; index i in the table is <paramref name="fds"/>[i] (-1 leaves a hole).</summary>
    public void RegisterFiles(ReadOnlySpan<int> fds)
    {
        fixed (int* p = fds)
        {
            Register(RegisterOp.Files, p, (uint)fds.Length, "IORING_REGISTER_FILES");
        }
    }

    /// <summary>Replaces registered files starting at <paramref name="offset"/>.</summary>
    public void UpdateFiles(uint offset, ReadOnlySpan<int> fds)
    {
        fixed (int* p = fds)
        {
            var update = new FilesUpdate { offset = offset, fds = (ulong)p };
            Register(RegisterOp.FilesUpdate, &update, (uint)fds.Length, "IORING_REGISTER_FILES_UPDATE");
        }
    }

    public void UnregisterFiles() => Register(RegisterOp.UnregisterFiles, null, 0, "IORING_UNREGISTER_FILES");

    /// <summary>Registers fixed buffers for READ_FIXED/WRITE_FIXED. They are pinned and charged to RLIMIT_MEMLOCK.</summary>
    public void RegisterBuffers(ReadOnlySpan<Iovec> buffers)
    {
        fixed (Iovec* p = buffers)
        {
            Register(RegisterOp.Buffers, p, (uint)buffers.Length, "IORING_REGISTER_BUFFERS");
        }
    }

    /// <summary>
    /// Registers a table of <paramref name="count"/> empty buffer slots (IORING_RSRC_REGISTER_SPARSE,
    /// Linux 5.19+), for buffers others install at an index: ublk's zero copy puts a request's pages there.
    /// </summary>
    public void RegisterSparseBuffers(uint count)
    {
        var reg = new RsrcRegister { nr = count, flags = RsrcRegister.RegisterSparse };
        Register(RegisterOp.Buffers2, &reg, (uint)sizeof(RsrcRegister), "IORING_REGISTER_BUFFERS2 (sparse)");
    }

    /// <summary>Installs user buffers at slots <paramref name="offset"/> onwards of a registered table (IORING_REGISTER_BUFFERS_UPDATE).</summary>
    public void UpdateBuffers(uint offset, ReadOnlySpan<Iovec> buffers)
    {
        fixed (Iovec* p = buffers)
        {
            var update = new RsrcUpdate2 { offset = offset, data = (ulong)p, nr = (uint)buffers.Length };
            Register(RegisterOp.BuffersUpdate, &update, (uint)sizeof(RsrcUpdate2), "IORING_REGISTER_BUFFERS_UPDATE");
        }
    }

    public void UnregisterBuffers() => Register(RegisterOp.UnregisterBuffers, null, 0, "IORING_UNREGISTER_BUFFERS");

    /// <summary>Makes the kernel signal <paramref name="eventFd"/> for every completion posted.</summary>
    public void RegisterEventFd(int eventFd)
    {
        var fd = eventFd;
        Register(RegisterOp.EventFd, &fd, 1, "IORING_REGISTER_EVENTFD");
    }

    public void UnregisterEventFd() => Register(RegisterOp.UnregisterEventFd, null, 0, "IORING_UNREGISTER_EVENTFD");

    /// <summary>io_uring_register for the binding's other types (<see cref="BufferRing"/>).</summary>
    internal void RegisterRaw(RegisterOp op, void* arg, uint count, string what) => Register(op, arg, count, what);

    private void Register(RegisterOp op, void* arg, uint count, string what)
    {
        ObjectDisposedException.ThrowIf(_fd < 0, this);
        while (true)
        {
            var r = Libc.syscall(Libc.SYS_io_uring_register, _fd, (long)op, (long)arg, count, 0, 0);
            if (r >= 0)
            {
                return;
            }
            var errno = Marshal.GetLastPInvokeError();
            if (errno == Errno.EINTR)
            {
                continue;
            }
            throw new ErrnoException(errno, what,
                errno == Errno.ENOMEM && op == RegisterOp.Buffers ? "Registered buffers count against RLIMIT_MEMLOCK (ulimit -l)" : null);
        }
    }

    public void Dispose()
    {
        var fd = Interlocked.Exchange(ref _fd, -1);
        if (fd < 0)
        {
            return;
        }
        _sqes.Dispose();
        _cqRing?.Dispose();
        _sqRing.Dispose();
        _ = Libc.close(fd);
        GC.SuppressFinalize(this);
    }

    [StructLayout(LayoutKind.Sequential)]
    private struct FilesUpdate
    {
        public uint offset;
        public uint resv;
        public ulong fds;
    }
}
