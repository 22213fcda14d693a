using System.Runtime.InteropServices;
using UblkSharp.Interop;

namespace UblkSharp.Targets;

/// <summary>
/// A block device's backend: the public way to write one. Override <see cref="Size"/> and
/// <see cref="Read"/>, and whatever else the device can do; the runtime fills in the rest
/// (nbdkit's model): write-zeroes becomes writes of zeros, FUA becomes a write then a flush, and
/// discard, flush and write are simply not offered when not overridden.
/// <para>
/// The methods run on a queue's own thread, one request at a time per queue, with buffers that
/// the kernel copies to or from. They return the bytes done (a short count is fine: the runtime
/// asks again for the remainder only) or a negative errno (-EAGAIN is retried). A thrown exception
/// fails that one request with EIO. Targets that do their own IO on the queue's io_uring override
/// <see cref="CreateUringBackend"/> instead.
/// </para>
/// </summary>
[System.Diagnostics.CodeAnalysis.DynamicallyAccessedMembers(System.Diagnostics.CodeAnalysis.DynamicallyAccessedMemberTypes.PublicMethods)]
public abstract unsafe class BlockTarget : IDisposable
{
    private const int ZerosLength = 64 * 1024;

    // Page-aligned, so that a target with an O_DIRECT backing file can write it as is. One per process.
    private static readonly byte* Zeros = AllocateZeros();
    private int _disposed;

    /// <summary>Capacity in bytes; a multiple of <see cref="LogicalBlockSize"/>.</summary>
    public abstract long Size { get; }

    /// <summary>Whether <see cref="Resize"/> can change <see cref="Size"/> while the device serves.</summary>
    public virtual bool CanResize => false;

    /// <summary>
    /// Takes a new capacity (a multiple of <see cref="LogicalBlockSize"/>) while queues serve. The
    /// runtime calls it before telling the kernel of a larger size, and after a smaller one, so the
    /// target always accepts the IO the kernel may send. <paramref name="growBacking"/>: a target
    /// with a backing file may extend the file to fit; without it, a file too small is an error.
    /// </summary>
    public virtual void Resize(long newSize, bool growBacking)
        => throw new NotSupportedException($"the {Kind} target cannot change its size");

    /// <summary>A short name for listings, e.g. "loop".</summary>
    public abstract string Kind { get; }

    /// <summary>Options that rebuild this target (for listings and, later, recovery).</summary>
    public virtual IReadOnlyDictionary<string, string> Recipe { get; } = new Dictionary<string, string>();

    public virtual int LogicalBlockSize => 512;

    public virtual int PhysicalBlockSize => 4096;

    /// <summary>Whether the device refuses writes. True unless <see cref="Write"/> is overridden.</summary>
    public virtual bool IsReadOnly => !Overrides(nameof(Write), typeof(ReadOnlySpan<byte>), typeof(long));

    /// <summary>Whether the backend has a volatile cache to flush; enables FLUSH and FUA.</summary>
    public virtual bool HasVolatileCache => Overrides(nameof(Flush));

    public virtual bool CanDiscard => Overrides(nameof(Discard), typeof(long), typeof(long));

    /// <summary>Write-zeroes is always offered on a writable device: the runtime falls back to writing zeros.</summary>
    public virtual bool CanWriteZeroes => !IsReadOnly;

    /// <summary>Whether FUA writes are native (else a FUA write is a write then a flush).</summary>
    public virtual bool HasNativeFua => false;

    public virtual bool IsRotational => false;

    /// <summary>
    /// Whether a new daemon that rebuilds this target from its recipe sees the same data, so the
    /// device may use user recovery. False by default: a target that keeps data in the daemon's
    /// memory would come back empty, which is silent data loss.
    /// </summary>
    public virtual bool SurvivesRestart => false;

    /// <summary>Why a device of this target may not use user recovery (when it may not), for the person who asked for it.</summary>
    public virtual string RecoveryRefusal => $"the {Kind} target keeps its data in the daemon's memory, so a recovered device would come back empty";

    /// <summary>
    /// Whether a new daemon that rebuilds this target from its recipe sees the same data once this
    /// one was disposed (it wrote out what it held in memory), so the device may use user recovery
    /// for a planned hand-over (`upgrade`) even where a crash would lose data. Defaults to
    /// <see cref="SurvivesRestart"/>.
    /// </summary>
    public virtual bool SurvivesHandOver => SurvivesRestart;

    public abstract int Read(Span<byte> buffer, long offset);

    public virtual int Write(ReadOnlySpan<byte> data, long offset) => -Errno.EROFS;

    /// <summary>A write that must be durable when it completes. The fill-in writes, then flushes.</summary>
    public virtual int WriteFua(ReadOnlySpan<byte> data, long offset)
    {
        var n = Write(data, offset);
        if (n <= 0)
        {
            return n;
        }
        var f = Flush();
        return f < 0 ? f : n;
    }

    public virtual int Flush() => 0;

    public virtual int Discard(long offset, long length) => -Errno.EOPNOTSUPP;

    /// <summary>
    /// Zeroes a range. The fill-in writes zeros, in 64 KiB steps; returns 0 or a negative errno.
    /// Short writes, -EAGAIN and -EINTR are handled as the runtime handles them (one policy,
    /// <see cref="RequestProgress"/>).
    /// </summary>
    public virtual int WriteZeroes(long offset, long length, bool mayUnmap)
    {
        if (length <= 0)
        {
            return 0;
        }
        var progress = new RequestProgress(StepKind.Write, length);
        int error;
        do
        {
            var chunk = (int)Math.Min(progress.Remaining, ZerosLength);
            var n = Write(new ReadOnlySpan<byte>(Zeros, chunk), offset + progress.Done);
            if (n > chunk)
            {
                n = chunk; // never count more than this step offered
            }
            if (!progress.Next(n, out error))
            {
                break;
            }
        }
        while (true);
        return error;
    }

    /// <summary>
    /// Whether <see cref="WriteZeroes"/> is cheap (no writes of zeros), so an NBD export may accept
    /// FAST_ZERO requests with it. True when a writable target overrides <see cref="WriteZeroes"/>.
    /// </summary>
    public virtual bool CanFastZero => !IsReadOnly && Overrides(nameof(WriteZeroes), typeof(long), typeof(long), typeof(bool));

    /// <summary>
    /// Describes the run that starts at <paramref name="offset"/>: returns its length (1 to
    /// <paramref name="length"/>) and how it is stored, or a negative errno; callers ask again for
    /// the rest (NBD's BLOCK_STATUS). The fill-in reports the whole range allocated, which is always safe.
    /// </summary>
    public virtual long GetAllocation(long offset, long length, out AllocationFlags flags)
    {
        flags = AllocationFlags.None;
        return length;
    }

    /// <summary>A hint that the range will be read soon (NBD's CACHE). The fill-in does nothing; returns 0 or a negative errno.</summary>
    public virtual int Cache(long offset, long length) => 0;

    /// <summary>
    /// Targets that submit their own IO on the queue's ring return a backend for one queue here
    /// (called once per queue, on that queue's thread). Null keeps the synchronous methods above.
    /// </summary>
    public virtual UringBackend? CreateUringBackend(int queueId) => null;

    /// <summary>
    /// Whether the target can serve reads and writes without the bytes in the daemon's memory
    /// (ublk zero copy, AUTO_BUF_REG on Linux 6.16+): its <see cref="CreateUringBackend"/> returns a
    /// backend that does its IO on the queue's ring (<see cref="UringBackend.Prepare"/>, or its own
    /// steps) and honours <see cref="BackendRequest.FixedBuffer"/> (READ_FIXED/WRITE_FIXED on that
    /// slot of the ring's buffer table). False by default: the target gets the request's bytes in a buffer, copied by
    /// the kernel, and may read and write them (a memory store, a checksum, a fault check).
    /// </summary>
    public virtual bool SupportsZeroCopy => false;

    /// <summary>
    /// Every read returns zeros and nothing else (the null target): the ublk runtime then serves
    /// reads from the tag's buffer, which it keeps zeroed, instead of calling <see cref="Read"/>
    /// to clear it each time. Internal: only a target that stores nothing can promise it.
    /// </summary>
    internal virtual bool ReadsZeros => false;

    /// <summary>
    /// A filter over this target's step results for one ublk queue or NBD connection
    /// (<paramref name="streamId"/> tells them apart), or null (the default): how a wrapper target
    /// such as <see cref="FaultTarget"/> sees results that do not pass through its methods.
    /// </summary>
    public virtual ResultFilter? CreateResultFilter(int streamId) => null;

    /// <summary>
    /// Releases the target once: later calls do nothing, so no target's <see cref="Dispose(bool)"/>
    /// runs twice (a second close or munmap could hit an fd number or mapping reused meanwhile).
    /// </summary>
    public void Dispose()
    {
        if (Interlocked.Exchange(ref _disposed, 1) != 0)
        {
            return;
        }
        Dispose(true);
        GC.SuppressFinalize(this);
    }

    protected virtual void Dispose(bool disposing)
    {
    }

    private static byte* AllocateZeros()
    {
        var p = NativeMemory.AlignedAlloc(ZerosLength, 4096);
        NativeMemory.Clear(p, ZerosLength);
        return (byte*)p;
    }

    // By exact signature: a target may add public overloads of the same name (GetMethod by name alone
    // then throws AmbiguousMatchException), and a `new` method that hides ours is not an override.
    private bool Overrides(string method, params Type[] parameters)
    {
        var m = GetType().GetMethod(method, System.Reflection.BindingFlags.Public | System.Reflection.BindingFlags.Instance, parameters);
        return m is not null && m.DeclaringType != typeof(BlockTarget) && m.GetBaseDefinition().DeclaringType == typeof(BlockTarget);
    }
}
