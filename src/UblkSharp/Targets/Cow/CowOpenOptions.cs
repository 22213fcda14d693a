namespace UblkSharp.Targets.Cow;

/// <summary>How a COW overlay is opened.</summary>
public sealed record CowOpenOptions
{
    /// <summary>Use this backing file instead of the one the header names (like uml_moo -b).</summary>
    public string? BackingFile { get; init; }

    /// <summary>
    /// Open the overlay even when the backing file's size or modification time differ from the
    /// header's (UML refuses such an overlay: the backing file may have changed under it).
    /// </summary>
    public bool IgnoreBackingMismatch { get; init; }

    public bool ReadOnly { get; init; }

    /// <summary>
    /// How often newly set bitmap bits are written back without a flush (their data is synced
    /// first). Zero writes them only on flush and close.
    /// </summary>
    public TimeSpan BitmapWriteback { get; init; } = TimeSpan.FromSeconds(1);

    /// <summary>How ublk queues do the IO: on their io_uring (Auto, unless a file is on tmpfs or ramfs, where io_uring would punt every step to a worker thread), or synchronously.</summary>
    public LoopIo Io { get; init; } = LoopIo.Auto;
}

/// <summary>The backing file's size or modification time is not what the COW header recorded.</summary>
public sealed class CowBackingMismatchException(string message) : IOException(message);

/// <summary>A file that is not a COW file, or a COW header this target cannot use.</summary>
public sealed class CowFormatException(string message) : IOException(message);
