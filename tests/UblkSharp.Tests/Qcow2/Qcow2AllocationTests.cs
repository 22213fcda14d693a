using System.Text.Json;
using UblkSharp.Targets;
using UblkSharp.Targets.Qcow2;
using UblkSharp.Tests.Cow;

namespace UblkSharp.Tests.Qcow2;

/// <summary><see cref="Qcow2Target.GetAllocation"/> (NBD block status) against `qemu-img map --output=json`.</summary>
public class Qcow2AllocationTests
{
    private sealed record MapEntry(long Start, long Length, bool Zero, bool Data);

    [Theory]
    [InlineData("cluster_size=65536")]
    [InlineData("cluster_size=65536,extended_l2=on")]
    public void AgreesWithQemuImgMap(string options)
    {
        using var dir = new ScratchDir();
        var baseImage = Qemu.Create(dir.File("base.qcow2"), "4M");
        Qemu.RunIo(baseImage, "qcow2", "write -P 0x01 1M 512k", "write -z 3M 64k");
        var top = Qemu.Create(dir.File("top.qcow2"), "8M", options, backing: "base.qcow2");
        Qemu.RunIo(top, "qcow2",
            "write -P 0x02 0 100k",
            "write -z 1M 64k",
            "write -P 0x03 1088k 4k",
            "write -z 5M 128k",
            "write -P 0x04 6M 8k");
        var map = Map(top);
        using var t = new Qcow2Target(top);
        var runs = 0;
        for (long offset = 0; offset < t.Size;)
        {
            var n = t.GetAllocation(offset, t.Size - offset, out var flags);
            Assert.True(n > 0, $"GetAllocation at {offset} returned {n}");
            // Every byte of the run agrees with the entry of the map that covers it.
            for (var at = offset; at < offset + n;)
            {
                var e = map.Single(m => m.Start <= at && at < m.Start + m.Length);
                // qemu-nbd's rule: no data is a hole, and zeros are zero (present or not).
                var expected = e.Data ? AllocationFlags.None
                    : e.Zero ? AllocationFlags.Hole | AllocationFlags.Zero
                    : AllocationFlags.Hole;
                Assert.True(expected == flags, $"run at {offset} (+{n}) is {flags}; qemu-img map says {e}");
                at = e.Start + e.Length;
            }
            offset += n;
            runs++;
        }
        Assert.True(runs >= 5, $"only {runs} runs");
    }

    [Fact]
    public void CompressedClustersAreData()
    {
        using var dir = new ScratchDir();
        var source = dir.File("s.raw");
        var data = new byte[2 << 20];
        data.AsSpan(0, 1 << 20).Fill(0x5a);
        File.WriteAllBytes(source, data);
        var image = dir.File("c.qcow2");
        Qemu.RunImg("convert", "-c", "-O", "qcow2", source, image);
        using var t = new Qcow2Target(image);
        var n = t.GetAllocation(0, t.Size, out var flags);
        Assert.Equal(AllocationFlags.None, flags);
        Assert.True(n > 0 && n <= 1 << 20);
        n = t.GetAllocation(1 << 20, t.Size - (1 << 20), out flags);
        Assert.Equal(AllocationFlags.Hole | AllocationFlags.Zero, flags);
        Assert.Equal(1 << 20, n);
    }

    private static List<MapEntry> Map(string image)
    {
        var json = Qemu.RunImg("map", "--output=json", image);
        using var doc = JsonDocument.Parse(json);
        return doc.RootElement.EnumerateArray().Select(e => new MapEntry(
            e.GetProperty("start").GetInt64(),
            e.GetProperty("length").GetInt64(),
            e.GetProperty("zero").GetBoolean(),
            e.GetProperty("data").GetBoolean())).ToList();
    }
}
