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
public abstract class BlockTarget : IDisposable
{
    private static readonly byte[] Zeros = GC.AllocateArray<byte>(64 * 1024, pinned: true);

    /// <summary>Capacity in bytes; a multiple of <see cref="LogicalBlockSize"/>.</summary>
    public abstract long Size { get; }

    /// <summary>A short name for listings, e.g. "loop".</summary>
    public abstract string Kind { get; }

    /// <summary>Options that rebuild this target (for listings and, later, recovery).</summary>
    public virtual IReadOnlyDictionary<string, string> Recipe { get; } = new Dictionary<string, string>();

    public virtual int LogicalBlockSize => 512;

    public virtual int PhysicalBlockSize => 4096;

    /// <summary>Whether the device refuses writes. True unless <see cref="Write"/> is overridden.</summary>
    public virtual bool IsReadOnly => !Overrides(nameof(Write));

    /// <summary>Whether the backend has a volatile cache to flush; enables FLUSH and FUA.</summary>
    public virtual bool HasVolatileCache => Overrides(nameof(Flush));

    public virtual bool CanDiscard => Overrides(nameof(Discard));

    /// <summary>Write-zeroes is always offered on a writable device: the runtime falls back to writing zeros.</summary>
    public virtual bool CanWriteZeroes => !IsReadOnly;

    /// <summary>Whether FUA writes are native (else a FUA write is a write then a flush).</summary>
    public virtual bool HasNativeFua => false;

    public virtual bool IsRotational => false;

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

    /// <summary>Zeroes a range. The fill-in writes zeros, in 64 KiB steps; returns 0 or a negative errno.</summary>
    public virtual int WriteZeroes(long offset, long length, bool mayUnmap)
    {
        while (length > 0)
        {
            var chunk = (int)Math.Min(length, Zeros.Length);
            var n = Write(Zeros.AsSpan(0, chunk), offset);
            if (n < 0 && n != -Errno.EAGAIN)
            {
                return n;
            }
            n = Math.Max(n, 0);
            offset += n;
            length -= n;
        }
        return 0;
    }

    /// <summary>
    /// Targets that submit their own IO on the queue's ring return a backend for one queue here
    /// (called once per queue, on that queue's thread). Null keeps the synchronous methods above.
    /// </summary>
    public virtual UringBackend? CreateUringBackend(int queueId) => null;

    public void Dispose()
    {
        Dispose(true);
        GC.SuppressFinalize(this);
    }

    protected virtual void Dispose(bool disposing)
    {
    }

    private bool Overrides(string method)
    {
        var m = GetType().GetMethod(method, System.Reflection.BindingFlags.Public | System.Reflection.BindingFlags.Instance);
        return m is not null && m.DeclaringType != typeof(BlockTarget);
    }
}
