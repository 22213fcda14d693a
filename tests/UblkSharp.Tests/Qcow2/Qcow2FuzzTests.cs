using System.Buffers.Binary;
using System.Diagnostics;
using UblkSharp.Targets.Qcow2;
using UblkSharp.Tests.Cow;

namespace UblkSharp.Tests.Qcow2;

/// <summary>
/// Seeded mutations of real images' metadata (header and extensions, L1 and L2 tables, the
/// snapshot table): opening either works or throws one of the clean exception types, and every
/// read afterwards returns its length or -EIO. Nothing else may escape, and nothing may hang.
/// </summary>
public class Qcow2FuzzTests
{
    private const int Eio = -5;

    [Theory]
    [InlineData("cluster_size=4096", 1)]
    [InlineData("cluster_size=16384,extended_l2=on", 2)]
    [InlineData("compressed", 3)]
    public void MutatedMetadataNeverEscapes(string kind, int seed)
    {
        using var dir = new ScratchDir();
        var original = File.ReadAllBytes(MakeImage(dir, kind));
        var regions = Regions(original);
        var rng = new Random(seed);
        var path = dir.File("mutant.qcow2");
        var clock = Stopwatch.StartNew();
        int opened = 0, refused = 0, eio = 0;
        var buf = new byte[256 << 10];
        for (var i = 0; i < 300; i++)
        {
            var bytes = (byte[])original.Clone();
            for (var m = rng.Next(1, 5); m > 0; m--)
            {
                var (start, length) = regions[rng.Next(regions.Count)];
                var at = start + rng.Next(length);
                bytes[at] = rng.Next(3) switch
                {
                    0 => (byte)rng.Next(256),
                    1 => (byte)(bytes[at] ^ (1 << rng.Next(8))),
                    _ => (byte)(rng.Next(2) == 0 ? 0 : 0xff),
                };
            }
            File.WriteAllBytes(path, bytes);
            Qcow2Target t;
            try
            {
                t = new Qcow2Target(path);
            }
            catch (Exception e) when (e is ArgumentException or IOException or InvalidDataException or UnauthorizedAccessException)
            {
                refused++;
                continue;
            }
            using (t)
            {
                opened++;
                var end = Math.Min(t.Size, 4L << 20) & ~511L;
                for (long off = 0; off < end; off += buf.Length)
                {
                    var n = (int)Math.Min(buf.Length, end - off);
                    var r = t.Read(buf.AsSpan(0, n), off);
                    Assert.True(r == n || r == Eio, $"mutation {i} (seed {seed}): read of {n} at {off} returned {r}");
                    eio += r == Eio ? 1 : 0;
                }
                for (long off = 0; off < end; off += 1 << 20)
                {
                    var r = t.GetAllocation(off, end - off, out _);
                    Assert.True(r > 0 || r == Eio, $"mutation {i} (seed {seed}): GetAllocation at {off} returned {r}");
                }
                _ = t.CountClusters();
            }
            Assert.True(clock.Elapsed < TimeSpan.FromSeconds(20), $"mutation {i} (seed {seed}): the fuzz run passed 20 s");
        }
        // Both outcomes must be common, or the mutations are not reaching the tables.
        Assert.True(opened > 10 && refused > 10, $"opened {opened}, refused {refused}, EIO reads {eio}");
    }

    private static string MakeImage(ScratchDir dir, string kind)
    {
        var image = dir.File("orig.qcow2");
        if (kind == "compressed")
        {
            var source = dir.File("source.raw");
            var data = new byte[2 << 20];
            for (var i = 0; i < data.Length; i++)
            {
                data[i] = (byte)(i / 1000);
            }
            File.WriteAllBytes(source, data);
            Qemu.RunImg("convert", "-c", "-O", "qcow2", "-o", "cluster_size=4096", source, image);
            Qemu.RunImg("snapshot", "-c", "s1", image);
            Qemu.RunIo(image, "qcow2", "write -P 0x11 64k 64k", "write -z 1M 64k");
            return image;
        }
        Qemu.Create(image, "2M", kind);
        Qemu.RunIo(image, "qcow2", "write -P 0x11 0 100k", "write -z 512k 64k", "write -P 0x22 1M 8k");
        Qemu.RunImg("snapshot", "-c", "s1", image);
        Qemu.RunIo(image, "qcow2", "write -P 0x33 4k 8k", "write -P 0x44 1536k 4k");
        return image;
    }

    /// <summary>Where the metadata is: the header area, the active L1 table, each L2 table it points to, the snapshot table.</summary>
    private static List<(int Start, int Length)> Regions(byte[] image)
    {
        var clusterSize = 1 << (int)BinaryPrimitives.ReadUInt32BigEndian(image.AsSpan(20));
        var regions = new List<(int, int)> { (0, 112), (0, Math.Min(clusterSize, 1024)) };
        var l1Size = (int)BinaryPrimitives.ReadUInt32BigEndian(image.AsSpan(36));
        var l1 = (int)BinaryPrimitives.ReadUInt64BigEndian(image.AsSpan(40));
        regions.Add((l1, l1Size * 8));
        for (var i = 0; i < l1Size; i++)
        {
            var l2 = (long)(BinaryPrimitives.ReadUInt64BigEndian(image.AsSpan(l1 + (i * 8))) & 0x00ff_ffff_ffff_fe00);
            if (l2 != 0)
            {
                // The first entries, where the written clusters are, twice: most mutations should land there.
                regions.Add(((int)l2, Math.Min(clusterSize, 512)));
                regions.Add(((int)l2, Math.Min(clusterSize, 512)));
            }
        }
        var snapshots = (int)BinaryPrimitives.ReadUInt64BigEndian(image.AsSpan(64));
        if (snapshots != 0)
        {
            regions.Add((snapshots, 64));
        }
        return regions;
    }
}
