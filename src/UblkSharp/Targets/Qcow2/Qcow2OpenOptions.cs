namespace UblkSharp.Targets.Qcow2;

/// <summary>How a qcow2 image is opened (read-only unless <see cref="Writable"/>).</summary>
public sealed record Qcow2OpenOptions
{
    /// <summary>
    /// Open the top image for writing (the backing chain stays read-only). Refused for images with
    /// internal snapshots, extended L2 entries, persistent bitmaps, the dirty or corrupt bit, or with <see cref="Snapshot"/>.
    /// </summary>
    public bool Writable { get; init; }

    /// <summary>Use this backing file instead of the one the header names (its format probed by magic).</summary>
    public string? BackingFile { get; init; }

    /// <summary>Serve this internal snapshot (an id, else a name) instead of the active image.</summary>
    public string? Snapshot { get; init; }

    /// <summary>Bytes of L2 tables each image of the chain keeps in memory (at least one table).</summary>
    public long CacheSize { get; init; } = DefaultCacheSize;

    /// <summary>1 MiB: 16 tables of 64 KiB clusters, which map 8 GiB of guest disk.</summary>
    public const long DefaultCacheSize = 1 << 20;

    /// <summary>The deepest backing chain opened; deeper ones are refused (each image holds a cache).</summary>
    public const int MaxChainDepth = 64;
}
