namespace UblkSharp.Targets;

/// <summary>
/// A target that moves request data itself between the ublk char device and its storage
/// (UBLK_F_USER_COPY): one copy where the driver's own copy into the queue's buffer and the
/// target's copy out of it would make two. Queues call it on their own threads, concurrently.
/// </summary>
internal interface IUserCopyTarget
{
    /// <summary>Marker for "not done here": the queue then uses the tag's buffer and the target's usual methods.</summary>
    public const int NotDirect = int.MinValue;

    /// <summary>Whether a new device for this target should ask for UBLK_F_USER_COPY.</summary>
    bool WantsUserCopy { get; }

    /// <summary>
    /// A READ: writes <paramref name="length"/> bytes from <paramref name="offset"/> into the request
    /// at <paramref name="requestPosition"/> of <paramref name="charFd"/>. Returns the whole length or
    /// <see cref="NotDirect"/>, after which the queue serves the whole request the usual way (so a
    /// failure part way leaves nothing to undo: the usual way redoes every byte).
    /// </summary>
    int ReadToRequest(int charFd, long requestPosition, long offset, int length);

    /// <summary>A WRITE, taking the request's data from <paramref name="charFd"/>; as <see cref="ReadToRequest"/>.</summary>
    int WriteFromRequest(int charFd, long requestPosition, long offset, int length, bool fua);
}
