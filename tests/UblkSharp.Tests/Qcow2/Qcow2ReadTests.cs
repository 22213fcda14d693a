using System.Globalization;
using UblkSharp.Targets.Qcow2;
using UblkSharp.Tests.Cow;

namespace UblkSharp.Tests.Qcow2;

/// <summary>
/// Images made by qemu-img and written by qemu-io, read whole through <see cref="Qcow2Target.Read"/>
/// in awkward pieces and compared with what `qemu-img convert -O raw` reads from them.
/// </summary>
public class Qcow2ReadTests
{
    private static string S(long v) => v.ToString(CultureInfo.InvariantCulture);

    /// <summary>Writes that leave data, zero and unallocated clusters, a partial overwrite and the last sector.</summary>
    private static void Scribble(string image, long size, long cluster)
    {
        Qemu.RunIo(image, "qcow2",
            $"write -P 0x11 0 {S(Math.Max(512, cluster * 3 / 2 / 512 * 512))}",
            $"write -P 0x22 {S((size / 2) + 512)} 65536",
            $"write -z {S(cluster * 4)} {S(cluster * 2)}",
            $"write -P 0x33 {S((cluster * 4) + 512)} 512",
            $"write -P 0x55 {S(size / 4)} {S(cluster)}",
            $"discard {S(size / 4)} {S(cluster)}",
            $"write -P 0x44 {S(size - 4096)} 4096");
    }

    [Theory]
    [InlineData(512)]
    [InlineData(4096)]
    [InlineData(65536)]
    [InlineData(2 << 20)]
    public void ReadsWhatQemuReadsAtEveryClusterSize(int cluster)
    {
        using var dir = new ScratchDir();
        var size = Math.Max(8L << 20, cluster * 8L);
        var image = Qemu.Create(dir.File("a.qcow2"), S(size), $"cluster_size={S(cluster)}");
        Scribble(image, size, cluster);
        using var t = new Qcow2Target(image, new Qcow2OpenOptions());
        Assert.Equal(3, t.Header.Version);
        Assert.Equal(cluster, t.Header.ClusterSize);
        Qcow2Reads.MatchesQemu(t, Qemu.ReadRaw(image));
    }

    [Fact]
    public void ReadsAVersion2Image()
    {
        using var dir = new ScratchDir();
        var image = Qemu.Create(dir.File("v2.qcow2"), "8M", "compat=0.10,cluster_size=4096");
        Scribble(image, 8 << 20, 4096);
        using var t = new Qcow2Target(image);
        Assert.Equal(2, t.Header.Version);
        Qcow2Reads.MatchesQemu(t, Qemu.ReadRaw(image));
    }

    [Theory]
    [InlineData(16384)]
    [InlineData(65536)]
    [InlineData(2 << 20)]
    public void ReadsExtendedL2SubclustersOverABackingFile(int cluster)
    {
        using var dir = new ScratchDir();
        var size = Math.Max(8L << 20, cluster * 8L);
        var sub = cluster / 32;
        var baseImage = Qemu.Create(dir.File("base.qcow2"), S(size));
        Qemu.RunIo(baseImage, "qcow2", $"write -P 0x77 0 {S(size)}");
        var image = Qemu.Create(dir.File("top.qcow2"), S(size), $"cluster_size={S(cluster)},extended_l2=on", backing: "base.qcow2");
        Qemu.RunIo(image, "qcow2",
            $"write -P 0x11 {S(sub)} {S(sub * 2)}",
            $"write -z {S(sub * 5)} {S(sub)}",
            $"write -P 0x22 {S(cluster + (sub * 3) + 512)} 512",
            $"write -z {S(cluster * 3)} {S(cluster)}",
            $"write -P 0x33 {S((cluster * 5) - sub)} {S(sub * 2)}");
        using var t = new Qcow2Target(image);
        Assert.True(t.Header.ExtendedL2);
        Qcow2Reads.MatchesQemu(t, Qemu.ReadRaw(image));
    }

    [Theory]
    [InlineData("zlib", 512)]
    [InlineData("zlib", 4096)]
    [InlineData("zlib", 65536)]
    [InlineData("zlib", 2 << 20)]
    [InlineData("zstd", 4096)]
    [InlineData("zstd", 65536)]
    [InlineData("zstd", 2 << 20)]
    [InlineData("zlib", 65536, ",extended_l2=on")]
    [InlineData("zstd", 32768, ",extended_l2=on")]
    public void ReadsCompressedClusters(string type, int cluster, string extra = "")
    {
        using var dir = new ScratchDir();
        var size = Math.Max(4L << 20, cluster * 4L);
        var source = dir.File("source.raw");
        WriteMixedContent(source, size, seed: cluster);
        var image = dir.File("c.qcow2");
        Qemu.RunImg("convert", "-c", "-O", "qcow2", "-o", $"cluster_size={S(cluster)},compression_type={type}{extra}", source, image);
        // An uncompressed write and a zero write over compressed clusters.
        Qemu.RunIo(image, "qcow2", $"write -P 0x66 {S(cluster)} {S(cluster)}", $"write -z {S(cluster * 3)} {S(cluster)}");
        using var t = new Qcow2Target(image);
        Assert.Equal(type == "zstd" ? 1 : 0, t.Header.CompressionType);
        Assert.Equal(extra.Contains("extended_l2", StringComparison.Ordinal), t.Header.ExtendedL2);
        Assert.True(t.CountClusters().Compressed > 0, "qemu-img stored no cluster compressed");
        Qcow2Reads.MatchesQemu(t, Qemu.ReadRaw(image));
    }

    /// <summary>Text, runs of one byte, zeros and random bytes (stored uncompressed), in 8 KiB blocks.</summary>
    private static void WriteMixedContent(string path, long size, int seed)
    {
        var rng = new Random(seed);
        var data = new byte[size];
        var text = "qcow2 compressed cluster test, line after line of text. "u8;
        for (var off = 0; off < data.Length; off += 8192)
        {
            var block = data.AsSpan(off, (int)Math.Min(8192, data.Length - off));
            switch (rng.Next(4))
            {
                case 0:
                    for (var i = 0; i < block.Length; i++)
                    {
                        block[i] = text[(i + off) % text.Length];
                    }
                    break;
                case 1:
                    block.Fill((byte)rng.Next(256));
                    break;
                case 2:
                    break;
                default:
                    rng.NextBytes(block);
                    break;
            }
        }
        File.WriteAllBytes(path, data);
    }

    [Fact]
    public void ReadsAThreeDeepChainWithRelativeBackingNames()
    {
        using var dir = new ScratchDir();
        // A raw base smaller than the images over it: past its end the chain reads zeros.
        var baseRaw = dir.File("base.raw");
        File.WriteAllBytes(baseRaw, new byte[3 << 20]);
        Qemu.RunIo(baseRaw, "raw", "write -P 0xa1 0 3M", "write -P 0xa2 1M 4096");
        Directory.CreateDirectory(dir.File("sub"));
        var mid = Qemu.Create(dir.File("mid.qcow2"), "6M", "cluster_size=4096", backing: "base.raw", backingFormat: "raw");
        Qemu.RunIo(mid, "qcow2", "write -P 0xb1 512k 64k", "write -z 2M 64k", "write -P 0xb2 4M 4096");
        // The top sits in another directory and names its backing file relative to that one.
        var top = Qemu.Create(dir.File("sub/top.qcow2"), "8M", "cluster_size=65536", backing: "../mid.qcow2");
        Qemu.RunIo(top, "qcow2", "write -P 0xc1 0 4096", "write -z 512k 4096", "write -P 0xc2 7M 4096");
        using var t = new Qcow2Target(top);
        Assert.Equal(["qcow2", "qcow2", "raw"], t.Chain.Select(c => c.Format));
        Assert.Equal(baseRaw, t.Chain[2].Path);
        Assert.Equal("qcow2", t.Header.BackingFormat);
        Qcow2Reads.MatchesQemu(t, Qemu.ReadRaw(top));
    }

    [Fact]
    public void BackingOverrideIsProbedByMagic()
    {
        using var dir = new ScratchDir();
        var base1 = Qemu.Create(dir.File("base1.qcow2"), "4M");
        Qemu.RunIo(base1, "qcow2", "write -P 0x01 0 4M");
        var base2 = Qemu.Create(dir.File("base2.qcow2"), "4M");
        Qemu.RunIo(base2, "qcow2", "write -P 0x02 0 4M");
        var top = Qemu.Create(dir.File("top.qcow2"), "4M", backing: "base1.qcow2");
        Qemu.RunIo(top, "qcow2", "write -P 0x03 1M 4096");
        using var t = new Qcow2Target(top, new Qcow2OpenOptions { BackingFile = base2 });
        Assert.Equal(base2, t.Recipe["backing"]);
        var buf = new byte[4096];
        Assert.Equal(4096, t.Read(buf, 0));
        Assert.All(buf, b => Assert.Equal(0x02, b));
        Assert.Equal(4096, t.Read(buf, 1 << 20));
        Assert.All(buf, b => Assert.Equal(0x03, b));
    }

    [Fact]
    public void ABackingFileWithoutAFormatIsProbedByMagic()
    {
        using var dir = new ScratchDir();
        var baseRaw = dir.File("base.raw");
        File.WriteAllBytes(baseRaw, new byte[4 << 20]);
        Qemu.RunIo(baseRaw, "raw", "write -P 0x0a 0 4M");
        var mid = Qemu.Create(dir.File("mid.qcow2"), "4M", backing: "base.raw", backingFormat: "raw");
        Qemu.RunIo(mid, "qcow2", "write -P 0x0b 1M 64k");
        var top = Qemu.Create(dir.File("top.qcow2"), "4M", backing: "mid.qcow2");
        Qemu.RunIo(top, "qcow2", "write -P 0x0c 2M 64k");
        var expected = Qemu.ReadRaw(top);
        // qemu-img 7.2 always records the format: take the extension out by hand (an unknown type is skipped).
        foreach (var image in new[] { mid, top })
        {
            var bytes = File.ReadAllBytes(image);
            var at = bytes.AsSpan(0, 4096).IndexOf((ReadOnlySpan<byte>)[0xe2, 0x79, 0x2a, 0xca]);
            Assert.True(at >= 72, $"{image} has no backing format extension");
            bytes[at] = 0x12;
            File.WriteAllBytes(image, bytes);
        }
        using var t = new Qcow2Target(top);
        Assert.Null(t.Header.BackingFormat);
        Assert.Equal(["qcow2", "qcow2", "raw"], t.Chain.Select(c => c.Format));
        Qcow2Reads.MatchesQemu(t, expected);
    }

    [Fact]
    public void ServesInternalSnapshotsByNameAndId()
    {
        using var dir = new ScratchDir();
        var image = Qemu.Create(dir.File("s.qcow2"), "4M", "cluster_size=4096");
        Qemu.RunIo(image, "qcow2", "write -P 0x11 0 1M");
        Qemu.RunImg("snapshot", "-c", "snap1", image);
        Qemu.RunIo(image, "qcow2", "write -P 0x22 512k 1M", "write -z 0 64k");
        Qemu.RunImg("snapshot", "-c", "snap2", image);
        Qemu.RunIo(image, "qcow2", "write -P 0x33 3M 64k", "discard 512k 128k");

        using (var active = new Qcow2Target(image))
        {
            Assert.Equal(["snap1", "snap2"], active.Snapshots.Select(s => s.Name));
            Assert.Equal(["1", "2"], active.Snapshots.Select(s => s.Id));
            Assert.All(active.Snapshots, s => Assert.Equal(4L << 20, s.DiskSize));
            Assert.Null(active.Snapshot);
            Qcow2Reads.MatchesQemu(active, Qemu.ReadRaw(image));
        }
        using (var snap1 = new Qcow2Target(image, new Qcow2OpenOptions { Snapshot = "snap1" }))
        {
            Assert.Equal("snap1", snap1.Recipe["snapshot"]);
            Qcow2Reads.MatchesQemu(snap1, Qemu.ReadRaw(image, "snap1"));
        }
        using (var snap2 = new Qcow2Target(image, new Qcow2OpenOptions { Snapshot = "2" }))
        {
            Assert.Equal("snap2", snap2.Snapshot!.Name);
            Qcow2Reads.MatchesQemu(snap2, Qemu.ReadRaw(image, "snap2"));
        }
    }

    [Fact]
    public void ACacheOfOneTableStillReadsEverything()
    {
        using var dir = new ScratchDir();
        // 512-byte clusters: each L2 table maps 32 KiB, so 2 MiB needs 64 tables.
        var image = Qemu.Create(dir.File("small.qcow2"), "2M", "cluster_size=512");
        Scribble(image, 2 << 20, 512);
        Qemu.RunIo(image, "qcow2", "write -P 0x99 100k 300k");
        using var t = new Qcow2Target(image, new Qcow2OpenOptions { CacheSize = 0 });
        Assert.Equal(1, t.CacheStats.Slots);
        Assert.Equal("0", t.Recipe["cache-size"]);
        Qcow2Reads.MatchesQemu(t, Qemu.ReadRaw(image));
        Assert.True(t.CacheStats.Misses > 64);
    }

    [Fact]
    public void ConcurrentReadersSeeTheSameData()
    {
        using var dir = new ScratchDir();
        var source = dir.File("source.raw");
        var rng = new Random(5);
        var data = new byte[8 << 20];
        rng.NextBytes(data.AsSpan(0, 4 << 20));
        File.WriteAllBytes(source, data);
        var image = dir.File("c.qcow2");
        // Compressed where it helps, four L2 tables of 4 KiB clusters in a cache of two: every lock is busy.
        Qemu.RunImg("convert", "-c", "-O", "qcow2", "-o", "cluster_size=4096", source, image);
        Qemu.RunIo(image, "qcow2", "write -P 0x42 1M 1M");
        var expected = Qemu.ReadRaw(image);
        using var t = new Qcow2Target(image, new Qcow2OpenOptions { CacheSize = 8192 });
        var failures = 0;
        Parallel.For(0, 4, worker =>
        {
            var r = new Random(worker);
            var buf = new byte[256 << 10];
            for (var i = 0; i < 300; i++)
            {
                var n = r.Next(1, 64) * 4096;
                var off = r.NextInt64((expected.Length - n) / 512) * 512;
                if (t.Read(buf.AsSpan(0, n), off) != n || !buf.AsSpan(0, n).SequenceEqual(expected.AsSpan((int)off, n)))
                {
                    Interlocked.Increment(ref failures);
                }
            }
        });
        Assert.Equal(0, failures);
    }

    [Fact]
    public void SteadyStateReadsOfUncompressedClustersAllocateNothing()
    {
        using var dir = new ScratchDir();
        var baseImage = Qemu.Create(dir.File("base.qcow2"), "8M");
        Qemu.RunIo(baseImage, "qcow2", "write -P 0x01 0 8M");
        var image = Qemu.Create(dir.File("top.qcow2"), "8M", "cluster_size=65536,extended_l2=on", backing: "base.qcow2");
        Qemu.RunIo(image, "qcow2", "write -P 0x02 0 1M", "write -z 2M 1M", "write -P 0x03 4M 4k");
        using var t = new Qcow2Target(image);
        var buf = new byte[128 << 10];
        var bad = 0;
        // No asserts inside the measured loop: an Assert call allocates by itself.
        void Pass()
        {
            for (long off = 0; off < t.Size; off += buf.Length)
            {
                bad += t.Read(buf, off) == buf.Length ? 0 : 1;
                bad += t.GetAllocation(off, buf.Length, out _) > 0 ? 0 : 1;
            }
        }
        Pass(); // warm: L2 tables cached, locks created
        var before = GC.GetAllocatedBytesForCurrentThread();
        for (var i = 0; i < 20; i++)
        {
            Pass();
        }
        var allocated = GC.GetAllocatedBytesForCurrentThread() - before;
        Assert.Equal(0, bad);
        Assert.Equal(0, allocated);
    }
}
