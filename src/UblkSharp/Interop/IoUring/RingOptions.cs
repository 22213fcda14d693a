namespace UblkSharp.Interop.IoUring;

/// <summary>How to set up a <see cref="Ring"/>.</summary>
public sealed record RingOptions
{
    /// <summary>Submission queue entries (rounded up to a power of two by the kernel).</summary>
    public uint Entries { get; init; } = 64;

    /// <summary>Completion queue entries; 0 leaves the kernel's default of twice <see cref="Entries"/>.</summary>
    public uint CompletionEntries { get; init; }

    /// <summary>128-byte SQEs, with an 80-byte URING_CMD payload. Required by /dev/ublk-control.</summary>
    public bool Sqe128 { get; init; }

    /// <summary>32-byte CQEs.</summary>
    public bool Cqe32 { get; init; }

    /// <summary>
    /// Only the creating thread submits. With <see cref="DeferTaskrun"/> this is the fastest mode for
    /// a ring owned by one thread, as a ublk queue's is. Dropped if the kernel refuses it.
    /// </summary>
    public bool SingleIssuer { get; init; }

    /// <summary>Run task work only when the thread enters the kernel. Dropped if the kernel refuses it.</summary>
    public bool CoopTaskrun { get; init; }

    /// <summary>Defer task work to io_uring_enter(GETEVENTS); needs <see cref="SingleIssuer"/>. Dropped if refused.</summary>
    public bool DeferTaskrun { get; init; }

    /// <summary>The setup used for a ublk control ring.</summary>
    public static RingOptions Control { get; } = new() { Entries = 32, Sqe128 = true };
}
