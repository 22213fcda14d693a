using System.Buffers.Binary;
using System.Text;

namespace UblkSharp.Targets.Cow;

/// <summary>
/// The header of a User-Mode Linux ubd COW file (arch/um/drivers/cow_user.c), and the layout it
/// implies: a bitmap with one bit per sector (bit <c>s % 8</c> of byte <c>s / 8</c>; set = the
/// sector lives in the COW file), then the data area, where device byte <c>x</c> is at
/// <see cref="DataOffset"/> + x.
/// <para>
/// Version 3 (what UML, uml_mkcow and this class write) is packed and big-endian:
/// magic "OOOM" (0x4f4f4f4d), version, mtime (u32), size (u64), sector size, alignment,
/// cow_format (0 = bitmap), then the backing file's absolute path in 4096 bytes; 4128 bytes in
/// all. The bitmap starts at the header size rounded up to the alignment, the data at the end of
/// the bitmap rounded up to the alignment. Versions 1 and 2, and the "broken" 64-bit version 3
/// layout (mtime as 8 bytes, written by some 64-bit builds before 2006), are read as UML reads them.
/// </para>
/// </summary>
public sealed record CowHeader
{
    public const uint Magic = 0x4f4f4f4d;

    /// <summary>The version this class writes.</summary>
    public const int CurrentVersion = 3;

    /// <summary>Bytes of the backing path field in versions 2 and 3 (PATH_LEN_V3).</summary>
    public const int PathLength = 4096;

    /// <summary>sizeof(struct cow_header_v3), packed.</summary>
    public const int V3Size = 4 + 4 + 4 + 8 + 4 + 4 + 4 + PathLength;

    /// <summary>Bytes UML reads to parse any version (sizeof(union cow_header)).</summary>
    public const int MaxSize = 4136;

    private const int V1PathLength = 256;
    private const int V1Size = 4 + 4 + V1PathLength + 4 + 8 + 4;
    private const int V2Size = 4 + 4 + PathLength + 4 + 8 + 4;

    // The broken layout: 4 bytes of padding after mtime on 64-bit; the struct is 8-aligned.
    private const int V3BrokenSize = 4136;

    public required int Version { get; init; }

    /// <summary>The backing file as the header names it.</summary>
    public required string BackingFile { get; init; }

    /// <summary>The backing file's modification time (seconds since 1970) when the COW file was made.</summary>
    public required long MTime { get; init; }

    /// <summary>The backing file's size in bytes when the COW file was made.</summary>
    public required long Size { get; init; }

    /// <summary>Bytes per bitmap bit (512 in every file UML makes).</summary>
    public required int SectorSize { get; init; }

    public required int Alignment { get; init; }

    /// <summary>0 = the traditional bitmap, the only format there is.</summary>
    public int CowFormat { get; init; }

    /// <summary>Whether this is the broken 64-bit version 3 layout.</summary>
    public bool IsBrokenV3Layout { get; init; }

    /// <summary>Where the bitmap starts in the COW file.</summary>
    public long BitmapOffset => Version switch
    {
        1 => V1Size,
        2 => V2Size,
        _ => RoundUp(IsBrokenV3Layout ? V3BrokenSize : V3Size, Alignment),
    };

    /// <summary>Bitmap bytes (cow_sizes(); versions 1 and 2 keep their rounding bug).</summary>
    public long BitmapLength => Version < 3
        ? (Size + SectorSize - 1) / (8L * SectorSize)
        : DivRoundUp(DivRoundUp(Size, SectorSize), 8);

    /// <summary>Where the data area starts in the COW file.</summary>
    public long DataOffset => Version < 3
        ? RoundUp(BitmapOffset + BitmapLength, SectorSize)
        : RoundUp(BitmapOffset + BitmapLength, Alignment);

    /// <summary>Sectors the bitmap has a bit for (the v1/v2 rounding bug can leave the last few out).</summary>
    public long BitmapSectors => Math.Min(DivRoundUp(Size, SectorSize), BitmapLength * 8);

    /// <summary>The header of a new COW file over a backing file (what uml_mkcow writes).</summary>
    public static CowHeader Create(string backingFile, long mtime, long size, int sectorSize = 512, int alignment = 4096)
    {
        ArgumentNullException.ThrowIfNull(backingFile);
        if (Encoding.UTF8.GetByteCount(backingFile) > PathLength - 1)
        {
            throw new ArgumentException($"the backing file's path is longer than {PathLength - 1} bytes, the most a COW header holds");
        }
        var h = new CowHeader
        {
            Version = CurrentVersion,
            BackingFile = backingFile,
            MTime = mtime,
            Size = size,
            SectorSize = sectorSize,
            Alignment = alignment,
        };
        h.Validate("new COW file");
        return h;
    }

    /// <summary>The version 3 header bytes (<see cref="V3Size"/> of them), as write_cow_header() lays them out.</summary>
    public byte[] ToBytes()
    {
        if (Version != 3 || IsBrokenV3Layout)
        {
            throw new InvalidOperationException($"only version 3 headers are written (this one is version {Version})");
        }
        var b = new byte[V3Size];
        BinaryPrimitives.WriteUInt32BigEndian(b, Magic);
        BinaryPrimitives.WriteUInt32BigEndian(b.AsSpan(4), 3);
        BinaryPrimitives.WriteUInt32BigEndian(b.AsSpan(8), unchecked((uint)MTime));
        BinaryPrimitives.WriteUInt64BigEndian(b.AsSpan(12), (ulong)Size);
        BinaryPrimitives.WriteUInt32BigEndian(b.AsSpan(20), (uint)SectorSize);
        BinaryPrimitives.WriteUInt32BigEndian(b.AsSpan(24), (uint)Alignment);
        BinaryPrimitives.WriteUInt32BigEndian(b.AsSpan(28), (uint)CowFormat);
        Encoding.UTF8.GetBytes(BackingFile, b.AsSpan(32, PathLength - 1));
        return b;
    }

    /// <summary>Parses the first bytes of a file (up to <see cref="MaxSize"/>); <paramref name="name"/> is for messages.</summary>
    /// <exception cref="CowFormatException">Not a COW file, or a header that cannot be used.</exception>
    public static CowHeader Parse(ReadOnlySpan<byte> data, string name)
    {
        if (data.Length < 8)
        {
            throw new CowFormatException($"{name} is not a UML COW file: it is only {data.Length} bytes long");
        }
        // Version 1 was written in the host's order; later versions in network (big-endian) order.
        uint version;
        bool bigEndian;
        if (BinaryPrimitives.ReadUInt32BigEndian(data) == Magic)
        {
            bigEndian = true;
            version = BinaryPrimitives.ReadUInt32BigEndian(data[4..]);
        }
        else if (BinaryPrimitives.ReadUInt32LittleEndian(data) == Magic)
        {
            bigEndian = false;
            version = BinaryPrimitives.ReadUInt32LittleEndian(data[4..]);
        }
        else
        {
            throw new CowFormatException($"{name} is not a UML COW file (no \"OOOM\" magic at its start)");
        }

        CowHeader h;
        switch (version)
        {
            case 1:
                // cow_header_v1 is read field by field in host order whatever order the magic was in.
                Need(data, V1Size, name, 1);
                h = new CowHeader
                {
                    Version = 1,
                    BackingFile = CString(data.Slice(8, V1PathLength)),
                    MTime = BinaryPrimitives.ReadUInt32LittleEndian(data[(8 + V1PathLength)..]),
                    Size = (long)BinaryPrimitives.ReadUInt64LittleEndian(data[(12 + V1PathLength)..]),
                    SectorSize = BinaryPrimitives.ReadInt32LittleEndian(data[(20 + V1PathLength)..]),
                    Alignment = BinaryPrimitives.ReadInt32LittleEndian(data[(20 + V1PathLength)..]),
                };
                break;
            case 2:
                Need(data, V2Size, name, 2);
                h = new CowHeader
                {
                    Version = 2,
                    BackingFile = CString(data.Slice(8, PathLength)),
                    MTime = BinaryPrimitives.ReadUInt32BigEndian(data[(8 + PathLength)..]),
                    Size = (long)BinaryPrimitives.ReadUInt64BigEndian(data[(12 + PathLength)..]),
                    SectorSize = BinaryPrimitives.ReadInt32BigEndian(data[(20 + PathLength)..]),
                    Alignment = BinaryPrimitives.ReadInt32BigEndian(data[(20 + PathLength)..]),
                };
                break;
            case 3 when !bigEndian:
                throw new CowFormatException($"{name}: a version 3 COW header must be big-endian");
            case 3 when BinaryPrimitives.ReadUInt32LittleEndian(data[32..]) != 0:
                Need(data, V3Size, name, 3);
                h = new CowHeader
                {
                    Version = 3,
                    MTime = BinaryPrimitives.ReadUInt32BigEndian(data[8..]),
                    Size = (long)BinaryPrimitives.ReadUInt64BigEndian(data[12..]),
                    SectorSize = BinaryPrimitives.ReadInt32BigEndian(data[20..]),
                    Alignment = BinaryPrimitives.ReadInt32BigEndian(data[24..]),
                    CowFormat = BinaryPrimitives.ReadInt32BigEndian(data[28..]),
                    BackingFile = CString(data.Slice(32, PathLength)),
                };
                break;
            case 3:
                // cow_format (always 0) shifted onto the path's first 4 bytes: the broken 64-bit
                // layout. UML takes the low half of the 8-byte mtime through ntohl(); so do we.
                Need(data, V3BrokenSize, name, 3);
                h = new CowHeader
                {
                    Version = 3,
                    IsBrokenV3Layout = true,
                    MTime = BinaryPrimitives.ReadUInt32BigEndian(data[8..]),
                    Size = (long)BinaryPrimitives.ReadUInt64BigEndian(data[16..]),
                    SectorSize = BinaryPrimitives.ReadInt32BigEndian(data[24..]),
                    Alignment = BinaryPrimitives.ReadInt32BigEndian(data[28..]),
                    CowFormat = BinaryPrimitives.ReadInt32BigEndian(data[32..]),
                    BackingFile = CString(data.Slice(36, PathLength)),
                };
                break;
            default:
                throw new CowFormatException($"{name}: unsupported COW version {version} (versions 1, 2 and 3 are supported)");
        }
        h.Validate(name);
        return h;
    }

    private void Validate(string name)
    {
        if (CowFormat != 0)
        {
            throw new CowFormatException($"{name}: unsupported COW format {CowFormat} (only 0, the bitmap, exists)");
        }
        if (SectorSize < 512 || SectorSize > 65536 || (SectorSize & (SectorSize - 1)) != 0)
        {
            throw new CowFormatException($"{name}: bad sector size {SectorSize} in its COW header (a power of two from 512 to 65536 is expected)");
        }
        if (Alignment <= 0 || Alignment > (1 << 24))
        {
            throw new CowFormatException($"{name}: bad alignment {Alignment} in its COW header");
        }
        if (Size <= 0 || Size > (1L << 56))
        {
            throw new CowFormatException($"{name}: bad backing size {Size} in its COW header");
        }
        if (BackingFile.Length == 0)
        {
            throw new CowFormatException($"{name}: its COW header names no backing file");
        }
    }

    private static void Need(ReadOnlySpan<byte> data, int size, string name, int version)
    {
        if (data.Length < size)
        {
            throw new CowFormatException($"{name}: short COW header ({data.Length} bytes; a version {version} header has {size})");
        }
    }

    private static string CString(ReadOnlySpan<byte> field)
    {
        var end = field.IndexOf((byte)0);
        return Encoding.UTF8.GetString(end < 0 ? field : field[..end]);
    }

    internal static long DivRoundUp(long x, long len) => (x + len - 1) / len;

    internal static long RoundUp(long x, long align) => DivRoundUp(x, align) * align;
}
