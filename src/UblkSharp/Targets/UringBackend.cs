using UblkSharp.Interop.IoUring;
using UblkSharp.Ublk;

namespace UblkSharp.Targets;

/// <summary>
/// The part of one request still to do: the runtime narrows it after a short completion, so a
/// backend never submits work that already completed.
/// </summary>
public readonly unsafe struct BackendRequest
{
    public BackendRequest(IoOp op, IoFlags flags, long offset, long length, byte* buffer)
    {
        Op = op;
        Flags = flags;
        Offset = offset;
        Length = length;
        Buffer = buffer;
    }

    public IoOp Op { get; }

    public IoFlags Flags { get; }

    /// <summary>Byte offset on the device.</summary>
    public long Offset { get; }

    /// <summary>Bytes left to do (for DISCARD and WRITE_ZEROES, the range length).</summary>
    public long Length { get; }

    /// <summary>Where the remaining data is (READ: to fill; WRITE: to take). Null for other ops.</summary>
    public byte* Buffer { get; }

    public bool IsFua => (Flags & IoFlags.Fua) != 0;
}

/// <summary>
/// The io_uring-native path of a target: it prepares one SQE per step of a request on the queue's
/// own ring, beside the ublk commands, with no thread hop. The runtime submits it, reads the
/// completion, retries the remainder of a short one and commits the request exactly once.
/// One instance per queue, used only on that queue's thread.
/// </summary>
public abstract class UringBackend : IDisposable
{
    /// <summary>The fixed-file index of <see cref="Files"/>[0]; index 0 is the ublk char device.</summary>
    public const int FirstFixedFile = 1;

    /// <summary>Files to register on the queue's ring, at <see cref="FirstFixedFile"/> onwards.</summary>
    public virtual IReadOnlyList<int> Files => [];

    /// <summary>Fills <paramref name="sqe"/> (zeroed) for the request; the runtime sets its user_data.</summary>
    public abstract void Prepare(ref Sqe sqe, in BackendRequest request);

    public void Dispose()
    {
        Dispose(true);
        GC.SuppressFinalize(this);
    }

    protected virtual void Dispose(bool disposing)
    {
    }
}
