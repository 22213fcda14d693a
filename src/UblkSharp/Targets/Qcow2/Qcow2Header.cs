using System.Buffers.Binary;
using System.Globalization;
using System.Text;

namespace UblkSharp.Targets.Qcow2;

/// <summary>
/// The header of a qcow2 image (qemu's docs/interop/qcow2.txt), versions 2 and 3, with the header
/// extensions a reader needs: the backing file's format, the feature name table (to name unknown
/// features in a refusal) and the external data file (refused). Every field that later sizes an
/// allocation or a read is checked here against fixed bounds and the file's length, so a hostile
/// header is refused at open with a message, never trusted.
/// </summary>
public sealed record Qcow2Header
{
    /// <summary>"QFI\xfb".</summary>
    public const uint Magic = 0x514649fb;

    public const int MinClusterBits = 9;

    /// <summary>qemu's own limit (2 MiB clusters).</summary>
    public const int MaxClusterBits = 21;

    /// <summary>qemu's limit on an L1 table: 32 MiB of entries.</summary>
    public const int MaxL1Entries = 32 * 1024 * 1024 / 8;

    /// <summary>qemu's limits on the snapshot table (QCOW_MAX_SNAPSHOTS).</summary>
    public const int MaxSnapshots = 65536;

    private const int V2HeaderLength = 72;
    private const int V3MinHeaderLength = 104;
    private const int MaxBackingNameLength = 1023;

    private const uint ExtensionEnd = 0;
    private const uint ExtensionBackingFormat = 0xe2792aca;
    private const uint ExtensionFeatureNames = 0x6803f857;
    private const uint ExtensionBitmaps = 0x23852875;
    private const uint ExtensionEncryption = 0x0537be77;
    private const uint ExtensionDataFile = 0x44415441;

    /// <summary>Incompatible feature bits (header bytes 72-79).</summary>
    public const ulong DirtyBit = 1 << 0;
    public const ulong CorruptBit = 1 << 1;
    public const ulong ExternalDataFileBit = 1 << 2;
    public const ulong CompressionTypeBit = 1 << 3;
    public const ulong ExtendedL2Bit = 1 << 4;
    private const ulong KnownIncompatible = DirtyBit | CorruptBit | ExternalDataFileBit | CompressionTypeBit | ExtendedL2Bit;

    public required int Version { get; init; }

    public required int ClusterBits { get; init; }

    public int ClusterSize => 1 << ClusterBits;

    /// <summary>The virtual disk's size in bytes, as the header gives it.</summary>
    public required long Size { get; init; }

    public required int CryptMethod { get; init; }

    public required int L1Size { get; init; }

    public required long L1TableOffset { get; init; }

    public required long RefcountTableOffset { get; init; }

    public required int RefcountTableClusters { get; init; }

    public required int SnapshotCount { get; init; }

    public required long SnapshotsOffset { get; init; }

    public ulong IncompatibleFeatures { get; init; }

    public ulong CompatibleFeatures { get; init; }

    public ulong AutoclearFeatures { get; init; }

    /// <summary>refcount_bits = 1 &lt;&lt; RefcountOrder (4 for version 2).</summary>
    public int RefcountOrder { get; init; } = 4;

    public int HeaderLength { get; init; } = V2HeaderLength;

    /// <summary>0 = zlib (raw deflate), 1 = zstd.</summary>
    public int CompressionType { get; init; }

    /// <summary>The backing file as the header names it, or null.</summary>
    public string? BackingFile { get; init; }

    /// <summary>The backing file's format from its header extension ("raw", "qcow2"...), or null (probe it).</summary>
    public string? BackingFormat { get; init; }

    /// <summary>The feature name table: (type 0 incompatible, 1 compatible, 2 autoclear; bit) → name.</summary>
    public IReadOnlyDictionary<(int Type, int Bit), string> FeatureNames { get; init; } = new Dictionary<(int, int), string>();

    /// <summary>Whether a bitmaps extension is present (persistent dirty bitmaps; ignored when reading).</summary>
    public bool HasBitmaps { get; init; }

    public bool ExtendedL2 => (IncompatibleFeatures & ExtendedL2Bit) != 0;

    /// <summary>Bytes per L2 entry: 8, or 16 with extended L2 entries.</summary>
    public int L2EntrySize => ExtendedL2 ? 16 : 8;

    /// <summary>Entries per L2 table (one cluster).</summary>
    public int L2Entries => ClusterSize / L2EntrySize;

    /// <summary>Guest bytes one L1 entry covers.</summary>
    public long BytesPerL1Entry => (long)L2Entries << ClusterBits;

    /// <summary>L1 entries needed to map <paramref name="size"/> guest bytes.</summary>
    public long L1EntriesFor(long size) => (size + BytesPerL1Entry - 1) / BytesPerL1Entry;

    public static string CompressionName(int type) => type switch
    {
        0 => "zlib",
        1 => "zstd",
        _ => string.Create(CultureInfo.InvariantCulture, $"unknown ({type})"),
    };

    /// <summary>The incompatible, compatible and autoclear bits set, by name where the image or this class knows one.</summary>
    public IEnumerable<string> FeatureList()
    {
        foreach (var (type, bits) in new[] { (0, IncompatibleFeatures), (1, CompatibleFeatures), (2, AutoclearFeatures) })
        {
            for (var bit = 0; bit < 64; bit++)
            {
                if ((bits & (1ul << bit)) != 0)
                {
                    yield return FeatureName(type, bit);
                }
            }
        }
    }

    private string FeatureName(int type, int bit)
    {
        if (FeatureNames.TryGetValue((type, bit), out var name) && name.Length > 0)
        {
            return name;
        }
        return (type, bit) switch
        {
            (0, 0) => "dirty bit",
            (0, 1) => "corrupt bit",
            (0, 2) => "external data file",
            (0, 3) => "compression type",
            (0, 4) => "extended L2 entries",
            (1, 0) => "lazy refcounts",
            (2, 0) => "bitmaps",
            (2, 1) => "raw external data",
            _ => string.Create(CultureInfo.InvariantCulture, $"{(type == 0 ? "incompatible" : type == 1 ? "compatible" : "autoclear")} bit {bit}"),
        };
    }

    /// <summary>Whether the first bytes of a file are the qcow2 magic.</summary>
    public static bool HasMagic(ReadOnlySpan<byte> start) => start.Length >= 4 && BinaryPrimitives.ReadUInt32BigEndian(start) == Magic;

    /// <summary>
    /// Parses a header from the start of an image: <paramref name="data"/> holds its first bytes
    /// (the first cluster, or all of a smaller file), <paramref name="fileLength"/> is the file's
    /// length, <paramref name="name"/> names it in messages.
    /// </summary>
    /// <exception cref="Qcow2FormatException">Not a qcow2 image, or one this reader refuses.</exception>
    public static Qcow2Header Parse(ReadOnlySpan<byte> data, long fileLength, string name)
    {
        if (data.Length < V2HeaderLength || !HasMagic(data))
        {
            throw new Qcow2FormatException($"{name} is not a qcow2 image (no \"QFI\\xfb\" magic at its start)");
        }
        var version = BinaryPrimitives.ReadUInt32BigEndian(data[4..]);
        if (version is not (2 or 3))
        {
            throw new Qcow2FormatException(Fmt($"{name}: unsupported qcow2 version {version} (versions 2 and 3 are supported)"));
        }
        var clusterBits = BinaryPrimitives.ReadUInt32BigEndian(data[20..]);
        if (clusterBits is < MinClusterBits or > MaxClusterBits)
        {
            throw new Qcow2FormatException(Fmt($"{name}: cluster_bits {clusterBits} is out of range (9 to 21: 512 bytes to 2 MiB clusters)"));
        }
        var h = new Qcow2Header
        {
            Version = (int)version,
            ClusterBits = (int)clusterBits,
            Size = CheckedLong(BinaryPrimitives.ReadUInt64BigEndian(data[24..]), name, "virtual size"),
            CryptMethod = Int(BinaryPrimitives.ReadUInt32BigEndian(data[32..])),
            L1Size = Int(BinaryPrimitives.ReadUInt32BigEndian(data[36..])),
            L1TableOffset = CheckedLong(BinaryPrimitives.ReadUInt64BigEndian(data[40..]), name, "L1 table offset"),
            RefcountTableOffset = CheckedLong(BinaryPrimitives.ReadUInt64BigEndian(data[48..]), name, "refcount table offset"),
            RefcountTableClusters = Int(BinaryPrimitives.ReadUInt32BigEndian(data[56..])),
            SnapshotCount = Int(BinaryPrimitives.ReadUInt32BigEndian(data[60..])),
            SnapshotsOffset = CheckedLong(BinaryPrimitives.ReadUInt64BigEndian(data[64..]), name, "snapshot table offset"),
        };
        var backingOffset = BinaryPrimitives.ReadUInt64BigEndian(data[8..]);
        var backingLength = BinaryPrimitives.ReadUInt32BigEndian(data[16..]);
        if (version == 3)
        {
            if (data.Length < V3MinHeaderLength)
            {
                throw new Qcow2FormatException($"{name}: short qcow2 version 3 header");
            }
            var headerLength = BinaryPrimitives.ReadUInt32BigEndian(data[100..]);
            if (headerLength < V3MinHeaderLength || headerLength % 8 != 0 || headerLength > h.ClusterSize || headerLength > data.Length)
            {
                throw new Qcow2FormatException(Fmt($"{name}: bad header_length {headerLength} (at least 104, a multiple of 8, within the first cluster)"));
            }
            h = h with
            {
                IncompatibleFeatures = BinaryPrimitives.ReadUInt64BigEndian(data[72..]),
                CompatibleFeatures = BinaryPrimitives.ReadUInt64BigEndian(data[80..]),
                AutoclearFeatures = BinaryPrimitives.ReadUInt64BigEndian(data[88..]),
                RefcountOrder = Int(BinaryPrimitives.ReadUInt32BigEndian(data[96..])),
                HeaderLength = (int)headerLength,
                // Byte 104, present only when the header is long enough to hold it.
                CompressionType = headerLength > 104 ? data[104] : 0,
            };
        }
        h = ReadExtensions(h, data, backingOffset, name);
        if (backingOffset != 0)
        {
            // qemu keeps the name within the first cluster and at most 1023 bytes.
            if (backingLength > MaxBackingNameLength || backingOffset > (ulong)data.Length || backingLength > (ulong)data.Length - backingOffset)
            {
                throw new Qcow2FormatException(Fmt($"{name}: bad backing file name ({backingLength} bytes at {backingOffset}; at most 1023 bytes within the first cluster)"));
            }
            var backing = Encoding.UTF8.GetString(data.Slice((int)backingOffset, (int)backingLength));
            h = h with { BackingFile = backing.Length == 0 ? null : backing };
        }
        h.Validate(fileLength, name);
        return h;
    }

    private static Qcow2Header ReadExtensions(Qcow2Header h, ReadOnlySpan<byte> data, ulong backingOffset, string name)
    {
        // Version 2 images have extensions too (the backing format), right after the 72 bytes.
        // Extensions end where the backing file name starts, else at the end of the first cluster.
        var end = (int)Math.Min(backingOffset != 0 && backingOffset < (ulong)h.ClusterSize ? (long)backingOffset : h.ClusterSize, data.Length);
        var offset = h.HeaderLength;
        var names = new Dictionary<(int, int), string>();
        string? backingFormat = null;
        var bitmaps = false;
        string? dataFile = null;
        while (offset <= end - 8)
        {
            var type = BinaryPrimitives.ReadUInt32BigEndian(data[offset..]);
            var length = BinaryPrimitives.ReadUInt32BigEndian(data[(offset + 4)..]);
            offset += 8;
            if (type == ExtensionEnd)
            {
                break;
            }
            if (length > (uint)(end - offset))
            {
                throw new Qcow2FormatException(Fmt($"{name}: header extension 0x{type:x8} is {length} bytes, past the end of the header area"));
            }
            var body = data.Slice(offset, (int)length);
            switch (type)
            {
                case ExtensionBackingFormat:
                    if (length > 15)
                    {
                        throw new Qcow2FormatException(Fmt($"{name}: backing format name of {length} bytes is too long"));
                    }
                    backingFormat = Encoding.ASCII.GetString(body);
                    break;
                case ExtensionFeatureNames:
                    for (var i = 0; i + 48 <= body.Length; i += 48)
                    {
                        var field = body.Slice(i + 2, 46);
                        var z = field.IndexOf((byte)0);
                        names[(body[i], body[i + 1])] = Encoding.UTF8.GetString(z < 0 ? field : field[..z]);
                    }
                    break;
                case ExtensionBitmaps:
                    bitmaps = true;
                    break;
                case ExtensionDataFile:
                    dataFile = Encoding.UTF8.GetString(body);
                    break;
                case ExtensionEncryption:
                default:
                    // The encryption pointer goes with crypt_method (refused); unknown extensions may be ignored.
                    break;
            }
            offset += (int)((length + 7) & ~7u);
        }
        if (dataFile is not null && (h.IncompatibleFeatures & ExternalDataFileBit) == 0)
        {
            throw new Qcow2FormatException($"{name}: an external data file ({dataFile}) is named, and external data files are not supported");
        }
        return h with { FeatureNames = names, BackingFormat = backingFormat, HasBitmaps = bitmaps };
    }

    private void Validate(long fileLength, string name)
    {
        var unknown = IncompatibleFeatures & ~KnownIncompatible;
        if (unknown != 0)
        {
            var list = new List<string>();
            for (var bit = 0; bit < 64; bit++)
            {
                if ((unknown & (1ul << bit)) != 0)
                {
                    list.Add(FeatureName(0, bit));
                }
            }
            throw new Qcow2FormatException($"{name}: unsupported incompatible qcow2 feature(s): {string.Join(", ", list)}");
        }
        if (CryptMethod != 0)
        {
            var method = CryptMethod switch { 1 => "AES", 2 => "LUKS", _ => Fmt($"method {CryptMethod}") };
            throw new Qcow2FormatException($"{name} is encrypted ({method}): encrypted qcow2 images are not supported");
        }
        if ((IncompatibleFeatures & ExternalDataFileBit) != 0)
        {
            throw new Qcow2FormatException($"{name} keeps its data in an external data file, which is not supported");
        }
        if ((IncompatibleFeatures & CompressionTypeBit) != 0 ? CompressionType == 0 : CompressionType != 0)
        {
            throw new Qcow2FormatException(Fmt($"{name}: compression type {CompressionType} does not agree with its compression type feature bit"));
        }
        if (CompressionType is not (0 or 1))
        {
            throw new Qcow2FormatException(Fmt($"{name}: unknown compression type {CompressionType} (0 zlib and 1 zstd are known)"));
        }
        if (ExtendedL2 && ClusterBits < 14)
        {
            throw new Qcow2FormatException(Fmt($"{name}: extended L2 entries need clusters of at least 16 KiB (this one has {ClusterSize} bytes)"));
        }
        if (RefcountOrder > 6)
        {
            throw new Qcow2FormatException(Fmt($"{name}: refcount_order {RefcountOrder} is out of range (at most 6)"));
        }
        // Above 2^56 no L2 entry could reach the data anyway; bounded so that no sum below overflows.
        if (Size > 1L << 56)
        {
            throw new Qcow2FormatException(Fmt($"{name}: virtual size {Size} is too large"));
        }
        CheckTable(L1TableOffset, L1Size, Size, fileLength, name, "L1 table");
        if (SnapshotCount > MaxSnapshots)
        {
            throw new Qcow2FormatException(Fmt($"{name}: {SnapshotCount} snapshots (at most {MaxSnapshots})"));
        }
        if (SnapshotCount > 0 && (SnapshotsOffset % ClusterSize != 0 || SnapshotsOffset == 0 || SnapshotsOffset >= fileLength))
        {
            throw new Qcow2FormatException(Fmt($"{name}: the snapshot table offset {SnapshotsOffset} is unaligned or outside the file"));
        }
    }

    /// <summary>Checks an L1 table (active or a snapshot's): aligned, within the file, big enough for <paramref name="size"/>, bounded.</summary>
    internal void CheckTable(long offset, long entries, long size, long fileLength, string name, string what)
    {
        if (entries > MaxL1Entries)
        {
            throw new Qcow2FormatException(Fmt($"{name}: the {what} has {entries} entries (at most {MaxL1Entries})"));
        }
        if (entries < L1EntriesFor(size))
        {
            throw new Qcow2FormatException(Fmt($"{name}: the {what} has {entries} entries, too few for {size} bytes"));
        }
        if (entries == 0)
        {
            return;
        }
        if (offset <= 0 || offset % ClusterSize != 0 || offset > fileLength || entries * 8 > fileLength - offset)
        {
            throw new Qcow2FormatException(Fmt($"{name}: the {what} ({entries} entries at {offset}) is unaligned or outside the file ({fileLength} bytes)"));
        }
    }

    private static int Int(uint v) => v > int.MaxValue ? int.MaxValue : (int)v;

    private static long CheckedLong(ulong v, string name, string what)
        => v <= long.MaxValue ? (long)v : throw new Qcow2FormatException(Fmt($"{name}: {what} {v} is out of range"));

    internal static string Fmt(FormattableString s) => s.ToString(CultureInfo.InvariantCulture);
}

/// <summary>A file that is not a qcow2 image, or one this reader cannot serve; an IOException, so the CLI prints its message.</summary>
public sealed class Qcow2FormatException(string message) : IOException(message);
