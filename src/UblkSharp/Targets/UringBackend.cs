using UblkSharp.Interop.IoUring;
using UblkSharp.Ublk;

namespace UblkSharp.Targets;

/// <summary>
/// The part of one request still to do: the runtime narrows it after a short completion, so a
/// backend never submits work that already completed.
/// </summary>
public readonly unsafe struct BackendRequest
{
    public BackendRequest(IoOp op, IoFlags flags, long offset, long length, byte* buffer, int fixedBuffer = NoFixedBuffer)
    {
        Op = op;
        Flags = flags;
        Offset = offset;
        Length = length;
        Buffer = buffer;
        FixedBuffer = fixedBuffer;
    }

    /// <summary><see cref="FixedBuffer"/> when the request's data is in <see cref="Buffer"/>.</summary>
    public const int NoFixedBuffer = -1;

    public IoOp Op { get; }

    public IoFlags Flags { get; }

    /// <summary>Byte offset on the device.</summary>
    public long Offset { get; }

    /// <summary>Bytes left to do (for DISCARD and WRITE_ZEROES, the range length).</summary>
    public long Length { get; }

    /// <summary>
    /// Where the remaining data is (READ: to fill; WRITE: to take). Null for other ops. Under zero
    /// copy (<see cref="FixedBuffer"/> set) it is not an address but the offset into the request's
    /// registered buffer, which is what READ_FIXED/WRITE_FIXED take for a buffer the kernel installed.
    /// </summary>
    public byte* Buffer { get; }

    /// <summary>
    /// Under zero copy (<see cref="BlockTarget.SupportsZeroCopy"/>), the slot of the queue ring's
    /// buffer table that holds the request's pages: READ and WRITE must be READ_FIXED/WRITE_FIXED on
    /// it, with <see cref="Buffer"/> as the offset. <see cref="NoFixedBuffer"/> otherwise.
    /// </summary>
    public int FixedBuffer { get; }

    public bool IsFua => (Flags & IoFlags.Fua) != 0;
}

/// <summary>The queue's ring as a backend that runs its own steps (<see cref="UringBackend.RunsSteps"/>) sees it. Queue thread only.</summary>
public interface IBackendRing
{
    /// <summary>
    /// The tag to give <see cref="GetSqe"/> for a step of the backend's own that serves no one
    /// request (a connection's receive, a timer): its completion comes to <see cref="UringBackend.OnStep"/> with this tag.
    /// </summary>
    const int NoTag = 0xffff;

    /// <summary>
    /// A zeroed SQE for a step of <paramref name="tag"/>'s request: prepare it with
    /// <paramref name="userData"/>, and its completion comes to <see cref="UringBackend.OnStep"/>
    /// with <paramref name="stepId"/>. The queue keeps serving until every such SQE has completed.
    /// </summary>
    ref Sqe GetSqe(int tag, uint stepId, out ulong userData);

    /// <summary>Ends the request <see cref="UringBackend.Start"/> left pending, with a result as Start's.</summary>
    void Complete(int tag, int result);
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

    /// <summary><see cref="Start"/>'s answer when the request is under way.</summary>
    public const int Pending = int.MinValue;

    /// <summary>
    /// Whether the backend runs each request in steps of its own on the ring (<see cref="Start"/>
    /// and <see cref="OnStep"/>) rather than one SQE per request (<see cref="Prepare"/>): for a
    /// target whose request touches several files or needs ordered metadata (the cow target: a read
    /// split between two files, a flush that syncs, writes the bitmap and syncs again).
    /// </summary>
    public virtual bool RunsSteps => false;

    /// <summary>
    /// With <see cref="RunsSteps"/>: starts the request <paramref name="tag"/> holds, taking SQEs from
    /// <paramref name="ring"/>. Returns <see cref="Pending"/> once it is under way (it then ends
    /// with one <see cref="IBackendRing.Complete"/>), or its result at once (bytes done, 0, or a
    /// negative errno), as a step's result is read: a short count has the remainder started again.
    /// </summary>
    public virtual int Start(IBackendRing ring, int tag, in BackendRequest request) => -Interop.Errno.EOPNOTSUPP;

    /// <summary>With <see cref="RunsSteps"/>: the completion of an SQE taken with <see cref="IBackendRing.GetSqe"/>.</summary>
    public virtual void OnStep(IBackendRing ring, int tag, uint stepId, int res)
    {
    }

    /// <summary>
    /// With <see cref="RunsSteps"/>: the queue has no request left and will get none (the device is
    /// stopping, or quiesced); it keeps serving until every SQE of the backend's has completed. A
    /// backend that keeps SQEs of its own pending (a socket's receive, a timer) ends them here.
    /// </summary>
    public virtual void OnQueueEnding(IBackendRing ring)
    {
    }

    public void Dispose()
    {
        Dispose(true);
        GC.SuppressFinalize(this);
    }

    protected virtual void Dispose(bool disposing)
    {
    }
}
