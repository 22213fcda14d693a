using System.Buffers.Binary;
using System.Text;
using UblkSharp.Targets.Cow;

namespace UblkSharp.Tests.Cow;

public class CowHeaderTests
{
    [Fact]
    public void CreateOverlayEqualsUmlMkcowByteForByte()
    {
        Uml.Require(Uml.MkCow);
        using var dir = new ScratchDir();
        var basePath = dir.RandomFile("base.img", (8 << 20) + 4096, 1);
        Uml.RunOk(Uml.MkCow, dir.File("theirs.cow"), basePath);
        var header = CowTarget.CreateOverlay(dir.File("ours.cow"), basePath);

        var theirs = File.ReadAllBytes(dir.File("theirs.cow"));
        var ours = File.ReadAllBytes(dir.File("ours.cow"));
        Assert.Equal(theirs.Length, ours.Length);
        Assert.True(theirs.AsSpan().SequenceEqual(ours), "the COW files differ");
        Assert.Equal(header.DataOffset + header.Size, ours.Length);
    }

    [Fact]
    public void ParsesUmlMkcowHeader()
    {
        Uml.Require(Uml.MkCow);
        using var dir = new ScratchDir();
        var basePath = dir.RandomFile("base.img", 3 << 20, 2);
        File.SetLastWriteTimeUtc(basePath, new DateTime(2021, 3, 4, 5, 6, 7, DateTimeKind.Utc));
        Uml.RunOk(Uml.MkCow, dir.File("c.cow"), basePath);

        var h = CowTarget.ReadHeader(dir.File("c.cow"));
        Assert.Equal(3, h.Version);
        Assert.False(h.IsBrokenV3Layout);
        Assert.Equal(basePath, h.BackingFile);
        Assert.Equal(3L << 20, h.Size);
        Assert.Equal(new DateTimeOffset(2021, 3, 4, 5, 6, 7, TimeSpan.Zero).ToUnixTimeSeconds(), h.MTime);
        Assert.Equal(512, h.SectorSize);
        Assert.Equal(4096, h.Alignment);
        Assert.Equal(8192, h.BitmapOffset); // 4128 rounded up to 4096
        Assert.Equal((3L << 20) / 512 / 8, h.BitmapLength);
        Assert.Equal(8192 + 4096, h.DataOffset);
    }

    [Fact]
    public void V3RoundTrip()
    {
        var h = CowHeader.Create("/some/where/base.img", 0x6b012f3f, 0x123456789a00, 512, 4096);
        var bytes = h.ToBytes();
        Assert.Equal(CowHeader.V3Size, bytes.Length);
        Assert.Equal("OOOM", Encoding.ASCII.GetString(bytes, 0, 4));
        Assert.Equal([0, 0, 0, 3], bytes[4..8]);
        Assert.Equal([0x6b, 0x01, 0x2f, 0x3f], bytes[8..12]);
        Assert.Equal(0x123456789a00UL, BinaryPrimitives.ReadUInt64BigEndian(bytes.AsSpan(12)));
        Assert.Equal("/some/where/base.img", Encoding.ASCII.GetString(bytes, 32, 20));
        var back = CowHeader.Parse(bytes, "x");
        Assert.Equal(h, back);
    }

    [Fact]
    public void OddSizesFollowCowSizes()
    {
        // cow_sizes() for v3: bitmap = ceil(ceil(size / sector) / 8), data at the alignment after it.
        var h = CowHeader.Create("/b", 1, 1_000_000, 512, 4096);
        Assert.Equal(245, h.BitmapLength); // 1954 sectors
        Assert.Equal(1954, h.BitmapSectors);
        Assert.Equal(8192 + 4096, h.DataOffset);
        var a512 = CowHeader.Create("/b", 1, 1_000_000, 512, 512);
        Assert.Equal(4608, a512.BitmapOffset);
        Assert.Equal(4608 + 512, a512.DataOffset);
    }

    [Fact]
    public void ReadsVersion2()
    {
        // struct cow_header_v2 (packed, big-endian): magic, version, backing_file[4096], mtime, size, sectorsize.
        var b = new byte[4120];
        BinaryPrimitives.WriteUInt32BigEndian(b, CowHeader.Magic);
        BinaryPrimitives.WriteUInt32BigEndian(b.AsSpan(4), 2);
        Encoding.ASCII.GetBytes("/old/base", b.AsSpan(8));
        BinaryPrimitives.WriteUInt32BigEndian(b.AsSpan(4104), 1234);
        BinaryPrimitives.WriteUInt64BigEndian(b.AsSpan(4108), 1 << 20);
        BinaryPrimitives.WriteInt32BigEndian(b.AsSpan(4116), 512);
        var h = CowHeader.Parse(b, "v2");
        Assert.Equal(2, h.Version);
        Assert.Equal("/old/base", h.BackingFile);
        Assert.Equal(1234, h.MTime);
        Assert.Equal(1L << 20, h.Size);
        Assert.Equal(4120, h.BitmapOffset);
        // The v2 rounding: (size + sector - 1) / (8 * sector) bytes, data at the next sector.
        Assert.Equal(256, h.BitmapLength);
        Assert.Equal(4608, h.DataOffset);
    }

    [Fact]
    public void ReadsVersion1InHostOrder()
    {
        var b = new byte[280];
        BinaryPrimitives.WriteUInt32LittleEndian(b, CowHeader.Magic);
        BinaryPrimitives.WriteUInt32LittleEndian(b.AsSpan(4), 1);
        Encoding.ASCII.GetBytes("/v1/base", b.AsSpan(8));
        BinaryPrimitives.WriteUInt32LittleEndian(b.AsSpan(264), 99);
        BinaryPrimitives.WriteUInt64LittleEndian(b.AsSpan(268), 4096);
        BinaryPrimitives.WriteInt32LittleEndian(b.AsSpan(276), 512);
        var h = CowHeader.Parse(b, "v1");
        Assert.Equal(1, h.Version);
        Assert.Equal("/v1/base", h.BackingFile);
        Assert.Equal(99, h.MTime);
        Assert.Equal(4096, h.Size);
        Assert.Equal(280, h.BitmapOffset);
        Assert.Equal(1, h.BitmapLength);
        Assert.Equal(512, h.DataOffset);
    }

    [Fact]
    public void ReadsTheBroken64BitV3Layout()
    {
        // 4 bytes of padding after the 32-bit mtime shift everything; cow_format lands on the path's first bytes.
        var b = new byte[4136];
        BinaryPrimitives.WriteUInt32BigEndian(b, CowHeader.Magic);
        BinaryPrimitives.WriteUInt32BigEndian(b.AsSpan(4), 3);
        BinaryPrimitives.WriteUInt32BigEndian(b.AsSpan(8), 777);
        BinaryPrimitives.WriteUInt64BigEndian(b.AsSpan(16), 1 << 20);
        BinaryPrimitives.WriteInt32BigEndian(b.AsSpan(24), 512);
        BinaryPrimitives.WriteInt32BigEndian(b.AsSpan(28), 4096);
        Encoding.ASCII.GetBytes("/broken/base", b.AsSpan(36));
        var h = CowHeader.Parse(b, "broken");
        Assert.True(h.IsBrokenV3Layout);
        Assert.Equal("/broken/base", h.BackingFile);
        Assert.Equal(777, h.MTime);
        Assert.Equal(1L << 20, h.Size);
        Assert.Equal(8192, h.BitmapOffset);
    }

    [Fact]
    public void RejectsWhatIsNotACowFile()
    {
        var e = Assert.Throws<CowFormatException>(() => CowHeader.Parse(new byte[4136], "disk.img"));
        Assert.Equal("disk.img is not a UML COW file (no \"OOOM\" magic at its start)", e.Message);

        var v9 = new byte[4136];
        BinaryPrimitives.WriteUInt32BigEndian(v9, CowHeader.Magic);
        BinaryPrimitives.WriteUInt32BigEndian(v9.AsSpan(4), 9);
        e = Assert.Throws<CowFormatException>(() => CowHeader.Parse(v9, "new.cow"));
        Assert.Equal("new.cow: unsupported COW version 9 (versions 1, 2 and 3 are supported)", e.Message);

        var good = CowHeader.Create("/b", 1, 4096).ToBytes();
        e = Assert.Throws<CowFormatException>(() => CowHeader.Parse(good.AsSpan(0, 100), "cut.cow"));
        Assert.Contains("short COW header", e.Message, StringComparison.Ordinal);

        BinaryPrimitives.WriteInt32BigEndian(good.AsSpan(24), 0);
        e = Assert.Throws<CowFormatException>(() => CowHeader.Parse(good, "zero.cow"));
        Assert.Contains("bad alignment 0", e.Message, StringComparison.Ordinal);
    }
}
