using System.Buffers.Binary;
using UblkSharp.Targets;
using UblkSharp.Targets.Qcow2;
using UblkSharp.Tests.Cow;

namespace UblkSharp.Tests.Qcow2;

/// <summary>Images this reader refuses, and how: one exception with a message a person can act on.</summary>
public class Qcow2RefusalTests
{
    private static Qcow2FormatException Refused(string image, Qcow2OpenOptions? options = null)
        => Assert.Throws<Qcow2FormatException>(() => new Qcow2Target(image, options).Dispose());

    private static string Patched(ScratchDir dir, Action<byte[]> patch)
    {
        var image = Qemu.Create(dir.File($"p{Guid.NewGuid():N}.qcow2"), "4M");
        Qemu.RunIo(image, "qcow2", "write -P 0x11 0 64k");
        var bytes = File.ReadAllBytes(image);
        patch(bytes);
        File.WriteAllBytes(image, bytes);
        return image;
    }

    [Fact]
    public void NotQcow2()
    {
        using var dir = new ScratchDir();
        var path = dir.RandomFile("random.img", 1 << 20, seed: 3);
        Assert.Contains("is not a qcow2 image", Refused(path).Message, StringComparison.Ordinal);
        var empty = dir.File("empty.img");
        File.WriteAllBytes(empty, []);
        Assert.Contains("is not a qcow2 image", Refused(empty).Message, StringComparison.Ordinal);
    }

    [Fact]
    public void UnknownVersion()
    {
        using var dir = new ScratchDir();
        var image = Patched(dir, b => b[7] = 4);
        Assert.Contains("unsupported qcow2 version 4", Refused(image).Message, StringComparison.Ordinal);
    }

    [Theory]
    [InlineData(8)]
    [InlineData(22)]
    [InlineData(63)]
    public void ClusterBitsOutOfRange(int bits)
    {
        using var dir = new ScratchDir();
        var image = Patched(dir, b => BinaryPrimitives.WriteUInt32BigEndian(b.AsSpan(20), (uint)bits));
        Assert.Contains($"cluster_bits {bits} is out of range", Refused(image).Message, StringComparison.Ordinal);
    }

    [Fact]
    public void UnknownIncompatibleFeature()
    {
        using var dir = new ScratchDir();
        // Bit 5 of incompatible_features (big-endian bytes 72-79).
        var image = Patched(dir, b => b[79] |= 0x20);
        Assert.Contains("unsupported incompatible qcow2 feature(s): incompatible bit 5", Refused(image).Message, StringComparison.Ordinal);
    }

    [Fact]
    public void Encrypted()
    {
        using var dir = new ScratchDir();
        var image = dir.File("luks.qcow2");
        string[] args = ["create", "-q", "-f", "qcow2", "--object", "secret,id=sec0,data=abc", "-o", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10", image, "1M"];
        // qemu times PBKDF2 on its own CPU clock to choose the iterations, and gives up ("Unable to
        // get accurate CPU usage") when a busy machine's clock shows no progress: try again.
        var (code, _, output) = Qemu.Run(Qemu.Img, args);
        for (var attempt = 1; code != 0 && attempt < 5 && output.Contains("accurate CPU usage", StringComparison.Ordinal); attempt++)
        {
            File.Delete(image);
            (code, _, output) = Qemu.Run(Qemu.Img, args);
        }
        Assert.True(code == 0, $"qemu-img {string.Join(' ', args)}: {output}");
        Assert.Contains("is encrypted (LUKS)", Refused(image).Message, StringComparison.Ordinal);
    }

    [Fact]
    public void ExternalDataFile()
    {
        using var dir = new ScratchDir();
        var image = Qemu.Create(dir.File("ext.qcow2"), "1M", $"data_file={dir.File("data.raw")}");
        Assert.Contains("external data file", Refused(image).Message, StringComparison.Ordinal);
    }

    [Fact]
    public void L1TableOutsideTheFileOrTooLarge()
    {
        using var dir = new ScratchDir();
        var far = Patched(dir, b => BinaryPrimitives.WriteUInt64BigEndian(b.AsSpan(40), 1UL << 40));
        Assert.Contains("outside the file", Refused(far).Message, StringComparison.Ordinal);
        var huge = Patched(dir, b => BinaryPrimitives.WriteUInt32BigEndian(b.AsSpan(36), uint.MaxValue));
        Assert.Contains("entries (at most", Refused(huge).Message, StringComparison.Ordinal);
        var small = Patched(dir, b => BinaryPrimitives.WriteUInt64BigEndian(b.AsSpan(24), 1UL << 40));
        Assert.Contains("too few for", Refused(small).Message, StringComparison.Ordinal);
    }

    [Fact]
    public void CorruptL2EntryFailsThatReadWithEio()
    {
        using var dir = new ScratchDir();
        var image = Qemu.Create(dir.File("c.qcow2"), "4M", "cluster_size=4096");
        Qemu.RunIo(image, "qcow2", "write -P 0x11 0 8k", "write -P 0x22 1M 4k");
        var bytes = File.ReadAllBytes(image);
        var l1 = (int)BinaryPrimitives.ReadUInt64BigEndian(bytes.AsSpan(40));
        var l2 = (int)(BinaryPrimitives.ReadUInt64BigEndian(bytes.AsSpan(l1)) & 0x00ff_ffff_ffff_fe00);
        // Cluster 0 points far past the end of the file; cluster 1 at an unaligned offset.
        BinaryPrimitives.WriteUInt64BigEndian(bytes.AsSpan(l2), (1UL << 63) | (1UL << 40));
        BinaryPrimitives.WriteUInt64BigEndian(bytes.AsSpan(l2 + 8), (1UL << 63) | 0x10200);
        File.WriteAllBytes(image, bytes);
        using var t = new Qcow2Target(image);
        var buf = new byte[4096];
        Assert.Equal(-5, t.Read(buf, 0));
        Assert.Equal(-5, t.Read(buf, 4096));
        Assert.Equal(4096, t.Read(buf, 1 << 20));
        Assert.All(buf, b => Assert.Equal(0x22, b));
        Assert.Equal(-5, t.GetAllocation(0, 4096, out _));
    }

    [Fact]
    public void DirtyAndCorruptBitsStillRead()
    {
        using var dir = new ScratchDir();
        // Both are about refcounts and writes; a read-only reader follows the L1 and L2 tables only.
        var image = Patched(dir, b => b[79] |= 0x03);
        using var t = new Qcow2Target(image);
        Assert.Contains("dirty bit", t.Header.FeatureList());
        Assert.Contains("corrupt bit", t.Header.FeatureList());
        var buf = new byte[65536];
        Assert.Equal(buf.Length, t.Read(buf, 0));
        Assert.All(buf, b => Assert.Equal(0x11, b));
    }

    [Fact]
    public void AZeroFlagInAVersion2ImageIsCorrupt()
    {
        using var dir = new ScratchDir();
        var image = Qemu.Create(dir.File("v2.qcow2"), "1M", "compat=0.10,cluster_size=4096");
        Qemu.RunIo(image, "qcow2", "write -P 0x11 0 8k");
        var bytes = File.ReadAllBytes(image);
        var l1 = (int)BinaryPrimitives.ReadUInt64BigEndian(bytes.AsSpan(40));
        var l2 = (int)(BinaryPrimitives.ReadUInt64BigEndian(bytes.AsSpan(l1)) & 0x00ff_ffff_ffff_fe00);
        bytes[l2 + 7] |= 1;
        File.WriteAllBytes(image, bytes);
        using var t = new Qcow2Target(image);
        var buf = new byte[4096];
        // As qemu: "Zero cluster entry found in pre-v3 image" fails the read.
        Assert.Equal(-5, t.Read(buf, 0));
        Assert.Equal(4096, t.Read(buf, 4096));
    }

    [Fact]
    public void BackingChainThatLoops()
    {
        using var dir = new ScratchDir();
        var image = Qemu.Create(dir.File("loop.qcow2"), "1M");
        Qemu.RunImg("rebase", "-u", "-b", "loop.qcow2", "-F", "qcow2", image);
        Assert.Contains("backing chain loops", Refused(image).Message, StringComparison.Ordinal);
    }

    [Fact]
    public void MissingBackingFileAndSnapshot()
    {
        using var dir = new ScratchDir();
        var baseImage = Qemu.Create(dir.File("base.qcow2"), "1M");
        var top = Qemu.Create(dir.File("top.qcow2"), "1M", backing: "base.qcow2");
        File.Delete(baseImage);
        var e = Assert.Throws<FileNotFoundException>(() => new Qcow2Target(top).Dispose());
        Assert.Contains("no such backing file", e.Message, StringComparison.Ordinal);
        var other = Qemu.Create(dir.File("other.qcow2"), "1M");
        Qemu.RunImg("snapshot", "-c", "only", other);
        Assert.Contains("has no snapshot 'nope' (it has: 1 'only')", Refused(other, new Qcow2OpenOptions { Snapshot = "nope" }).Message, StringComparison.Ordinal);
    }

    [Fact]
    public void TheFactoryOpensWritableUnlessReadOnlyAndSaysWhyNot()
    {
        using var dir = new ScratchDir();
        var image = Qemu.Create(dir.File("a.qcow2"), "1M");
        using (var w = TargetFactory.Create("qcow2", new Dictionary<string, string> { ["file"] = image }))
        {
            Assert.False(w.IsReadOnly);
            Assert.True(w.HasVolatileCache);
            Assert.Equal(new Dictionary<string, string> { ["file"] = image }, w.Recipe);
        }
        var snap = Qemu.Create(dir.File("s.qcow2"), "1M");
        Qemu.RunImg("snapshot", "-c", "s1", snap);
        var e = Assert.Throws<ArgumentException>(() => TargetFactory.Create("qcow2", new Dictionary<string, string> { ["file"] = snap }));
        Assert.Contains("internal snapshot(s)", e.Message, StringComparison.Ordinal);
        e = Assert.Throws<ArgumentException>(() => TargetFactory.Create("qcow2", new Dictionary<string, string> { ["file"] = dir.File("nope.qcow2"), ["read-only"] = "on" }));
        Assert.Contains("no such image", e.Message, StringComparison.Ordinal);
        e = Assert.Throws<ArgumentException>(() => TargetFactory.Create("qcow2", new Dictionary<string, string> { ["file"] = dir.RandomFile("r.img", 4096, 1), ["read-only"] = "on" }));
        Assert.Contains("is not a qcow2 image", e.Message, StringComparison.Ordinal);
        e = Assert.Throws<ArgumentException>(() => TargetFactory.Create("qcow2", new Dictionary<string, string> { ["file"] = image, ["read-only"] = "on", ["cache-size"] = "lots" }));
        Assert.Contains("bad --cache-size", e.Message, StringComparison.Ordinal);
        Assert.Contains("qcow2", TargetFactory.Kinds);
        using var t = TargetFactory.Create("qcow2", new Dictionary<string, string> { ["file"] = image, ["read-only"] = "on" });
        Assert.True(t.IsReadOnly);
        Assert.True(t.SurvivesRestart);
        Assert.Equal(new Dictionary<string, string> { ["file"] = image, ["read-only"] = "on" }, t.Recipe);
        // The recipe rebuilds the same target.
        using var again = TargetFactory.Create(t.Kind, t.Recipe);
        Assert.Equal(t.Size, again.Size);
    }
}
