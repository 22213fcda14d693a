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
    public long Length;
    /// <summary>Bytes of a READ/WRITE already done; only the rest is ever submitted again.</summary>
    public long Done;
    /// <summary>Under USER_COPY, bytes of a READ already in the request (the rest is copied from the buffer at commit).</summary>
    public long InRequest;
    public int Retries;
    public bool Busy;
    public byte* Buffer;

    public readonly long Remaining => Length - Done;
}
