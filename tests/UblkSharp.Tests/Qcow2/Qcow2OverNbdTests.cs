using System.Text.Json;
using UblkSharp.Targets.Qcow2;
using UblkSharp.Tests.Cow;
using UblkSharp.Tests.Nbd;

namespace UblkSharp.Tests.Qcow2;

/// <summary>A qcow2 chain exported over NBD (`serve -t qcow2`'s path): qemu reads and maps the export as it does the image.</summary>
public class Qcow2OverNbdTests
{
    [Fact]
    public void QemuSeesTheImagesDataAndMapThroughTheExport()
    {
        using var dir = new ScratchDir();
        var baseImage = Qemu.Create(dir.File("base.qcow2"), "4M", "cluster_size=4096");
        Qemu.RunIo(baseImage, "qcow2", "write -P 0x01 1M 512k", "write -z 3M 64k");
        var top = Qemu.Create(dir.File("top.qcow2"), "8M", "cluster_size=65536,extended_l2=on", backing: "base.qcow2");
        Qemu.RunIo(top, "qcow2", "write -P 0x02 0 100k", "write -z 1M 64k", "write -P 0x03 5M 8k");
        using var s = new TestServer(new Qcow2Target(top), readOnly: true);
        Assert.Contains("Images are identical", Tools.Ok("qemu-img", "compare", "-f", "qcow2", "-F", "raw", top, s.Uri), StringComparison.Ordinal);
        // Over NBD a hole reads "data": false and a zero run "zero": true, as the image's own map says.
        var image = Map("qcow2", top);
        foreach (var e in Map("raw", s.Uri))
        {
            for (var at = e.Start; at < e.Start + e.Length;)
            {
                var m = image.Single(i => i.Start <= at && at < i.Start + i.Length);
                Assert.True(m.Data == e.Data && m.Zero == e.Zero, $"export map {e} against image map {m}");
                at = Math.Min(e.Start + e.Length, m.Start + m.Length);
            }
        }
    }

    private sealed record Entry(long Start, long Length, bool Zero, bool Data);

    private static List<Entry> Map(string format, string what)
    {
        using var doc = JsonDocument.Parse(Tools.Ok("qemu-img", "map", "--output=json", "-f", format, what));
        return doc.RootElement.EnumerateArray().Select(e => new Entry(
            e.GetProperty("start").GetInt64(), e.GetProperty("length").GetInt64(),
            e.GetProperty("zero").GetBoolean(), e.GetProperty("data").GetBoolean())).ToList();
    }
}
