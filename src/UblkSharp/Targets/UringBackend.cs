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

    /// <summary>
    /// For backends whose IO completes outside the ring, in a library with its own threads (librbd):
    /// a descriptor, normally an eventfd, that becomes readable when submitted work has finished.
    /// The runtime keeps one 8-byte READ of it on the queue's ring and, when that completes, calls
    /// <see cref="Reap"/> on the queue thread. -1 (the default): the backend uses <see cref="Prepare"/>.
    /// </summary>
    public virtual int CompletionFd => -1;

    /// <summary>
    /// With a <see cref="CompletionFd"/>: starts the request that <paramref name="tag"/> holds.
    /// Returns 0 once it is under way (its result then comes from <see cref="Reap"/>), or the
    /// request's result at once (a negative errno).
    /// </summary>
    public virtual int Submit(int tag, in BackendRequest request) => -Interop.Errno.EOPNOTSUPP;

    /// <summary>
    /// With a <see cref="CompletionFd"/>: takes up to <paramref name="tags"/>.Length finished
    /// requests, their tags and results (bytes done, or a negative errno), and returns how many.
    /// The runtime calls it until it returns less than the span's length.
    /// </summary>
    public virtual int Reap(Span<int> tags, Span<int> results) => 0;

    public void Dispose()
    {
        Dispose(true);
        GC.SuppressFinalize(this);
    }

    protected virtual void Dispose(bool disposing)
    {
    }
}
