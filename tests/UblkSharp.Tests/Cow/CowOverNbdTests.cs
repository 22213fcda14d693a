using UblkSharp.Nbd.Protocol;
using UblkSharp.Targets;
using UblkSharp.Targets.Cow;
using UblkSharp.Tests.Nbd;

namespace UblkSharp.Tests.Cow;

/// <summary>The cow target exported over NBD (the `serve` path), driven by our NBD client.</summary>
public class CowOverNbdTests
{
    [Fact]
    public void ReadsWritesZeroesAndFlushesOverNbdLandInTheOverlay()
    {
        using var dir = new ScratchDir();
        var basePath = dir.RandomFile("base.img", 4 << 20, 3);
        var overlay = dir.File("o.cow");
        CowTarget.CreateOverlay(overlay, basePath);
        var model = File.ReadAllBytes(basePath);
        using (var server = new TestServer(new CowTarget(overlay)))
        using (var client = new NbdTarget(NbdUri.Parse(server.Uri)))
        {
            Assert.Equal(4L << 20, client.Size);
            var rng = new Random(8);
            for (var i = 0; i < 100; i++)
            {
                var n = rng.Next(1, 128) * 512;
                var off = rng.Next((4 << 20) - n) / 512 * 512L;
                var d = new byte[n];
                rng.NextBytes(d);
                Assert.Equal(n, client.Write(d, off));
                d.CopyTo(model, off);
            }
            Assert.Equal(0, client.WriteZeroes(1 << 20, 64 << 10, mayUnmap: true));
            Array.Clear(model, 1 << 20, 64 << 10);
            Assert.Equal(0, client.Flush());
            var back = new byte[model.Length];
            for (var off = 0; off < back.Length; off += 256 << 10)
            {
                Assert.Equal(256 << 10, client.Read(back.AsSpan(off, 256 << 10), off));
            }
            Assert.Equal(model, back);
        }
        using var reopened = new CowTarget(overlay, new CowOpenOptions { ReadOnly = true });
        Assert.Equal(model, CowFiles.ReadAll(reopened));
    }
}
