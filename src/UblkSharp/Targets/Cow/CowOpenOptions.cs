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
    /// first, by an fdatasync that writes out every dirty page of the COW file). Zero writes them
    /// only on flush and close. The default, 30 s, is the kernel's own dirty_expire for the page
    /// cache: a write nobody flushed is as durable as a buffered write to a file, and a round
    /// every second would force all data out 30 times sooner than the file system would.
    /// </summary>
    public TimeSpan BitmapWriteback { get; init; } = DefaultBitmapWriteback;

    /// <summary>The default <see cref="BitmapWriteback"/>.</summary>
    public static readonly TimeSpan DefaultBitmapWriteback = TimeSpan.FromSeconds(30);

    /// <summary>
    /// The first write into a chunk of this many bytes of the COW file's data area allocates the
    /// whole chunk (a power of two, at least 4 KiB), as qcow2 allocates a cluster: filling a sparse
    /// file 4 KiB at a time costs the file system far more than the writes. Zero leaves the file
    /// as sparse as what was written. The price is space: up to a chunk per scattered write.
    /// </summary>
    public long AllocationChunk { get; init; } = DefaultAllocationChunk;

    /// <summary>The default <see cref="AllocationChunk"/>: qcow2's default cluster size.</summary>
    public const long DefaultAllocationChunk = 64 << 10;

    /// <summary>How ublk queues do the IO: on their io_uring (Auto, unless a file is on tmpfs or ramfs, where io_uring would punt every step to a worker thread), or synchronously.</summary>
    public LoopIo Io { get; init; } = LoopIo.Auto;
}

/// <summary>The backing file's size or modification time is not what the COW header recorded.</summary>
public sealed class CowBackingMismatchException(string message) : IOException(message);

/// <summary>A file that is not a COW file, or a COW header this target cannot use.</summary>
public sealed class CowFormatException(string message) : IOException(message);
