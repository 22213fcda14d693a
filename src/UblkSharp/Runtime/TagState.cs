using UblkSharp.Targets;
using UblkSharp.Ublk;

namespace UblkSharp.Runtime;

/// <summary>
/// The request a tag holds, and how far its backend work has got. One per tag, reused for every
/// request on that tag: nothing is allocated per IO.
/// </summary>
internal unsafe struct TagState
{
    public IoOp Op;
    public IoFlags Flags;
    public long Offset;
    /// <summary>How far the request's READ/WRITE data has got, and its retries: only the rest is ever submitted again.</summary>
    public RequestProgress Progress;
    /// <summary>Under USER_COPY, bytes of a READ already in the request (the rest is copied from the buffer at commit).</summary>
    public long InRequest;
    /// <summary>
    /// From the fetch that handed the tag a request to its commit: a commit of a tag that is not
    /// busy would be a second one, which the queue refuses (and counts).
    /// </summary>
    public bool Busy;
    /// <summary>A READ or WRITE whose pages the driver installed in the ring's buffer table (zero copy): the tag's buffer is not its data.</summary>
    public bool ZeroCopy;
    /// <summary>Explicit zero copy: the request's pages are at slot `tag` until UNREGISTER_IO_BUF.</summary>
    public bool Registered;
    /// <summary>Explicit zero copy: the result the commit gives once the pages are unregistered.</summary>
    public int Result;
    /// <summary>Submitted to a completion-fd backend and not reaped yet.</summary>
    public bool InBackend;
    public byte* Buffer;
    /// <summary>
    /// How many bytes at the start of <see cref="Buffer"/> may hold a WRITE's data; the rest is
    /// zeros (the buffer is mapped anonymous). A target whose reads are all zeros clears only these.
    /// </summary>
    public long DirtyBytes;
    /// <summary>When the request arrived (<see cref="System.Diagnostics.Stopwatch.GetTimestamp"/>), for its latency.</summary>
    public long StartTicks;

    public readonly long Length => Progress.Length;

    public readonly long Done => Progress.Done;

    public readonly long Remaining => Progress.Remaining;
}
