using UblkSharp.Targets.Cow;

namespace UblkSharp.Tests.Cow;

public class CowMergeTests
{
    /// <summary>Random writes, discards and zeroes through the target; returns what the disk should now read.</summary>
    internal static byte[] Scribble(string overlay, string basePath, int seed, int ops = 400)
    {
        var model = File.ReadAllBytes(basePath);
        var rng = new Random(seed);
        var sectors = model.Length / 512;
        using var t = new CowTarget(overlay);
        for (var i = 0; i < ops; i++)
        {
            var n = rng.Next(1, 256);
            var s = rng.Next(sectors - n);
            switch (rng.Next(10))
            {
                case 0:
                    Assert.Equal(0, t.Discard(s * 512L, n * 512L));
                    Array.Clear(model, s * 512, n * 512);
                    break;
                case 1:
                    Assert.Equal(0, t.WriteZeroes(s * 512L, n * 512L, mayUnmap: false));
                    Array.Clear(model, s * 512, n * 512);
                    break;
                default:
                    var d = new byte[n * 512];
                    rng.NextBytes(d);
                    Assert.Equal(d.Length, t.Write(d, s * 512L));
                    d.CopyTo(model, s * 512);
                    break;
            }
        }
        return model;
    }

    [Fact]
    public void MergeIntoEqualsUmlMooByteForByte()
    {
        Uml.Require(Uml.Moo);
        using var dir = new ScratchDir();
        var basePath = dir.RandomFile("base.img", 8 << 20, 31);
        var overlay = dir.File("o.cow");
        CowTarget.CreateOverlay(overlay, basePath);
        var model = Scribble(overlay, basePath, 32);

        Uml.RunOk(Uml.Moo, overlay, dir.File("moo.img"));
        var progress = new List<(long, long)>();
        var r = CowMerge.Merge(overlay, dir.File("ours.img"), progress: (d, t) => progress.Add((d, t)));
        Assert.False(r.InPlace);
        Assert.Equal(8L << 20, r.Bytes);

        var moo = File.ReadAllBytes(dir.File("moo.img"));
        var ours = File.ReadAllBytes(dir.File("ours.img"));
        Assert.Equal(moo.Length, ours.Length);
        Assert.True(moo.AsSpan().SequenceEqual(ours), "cow merge and uml_moo differ");
        Assert.True(model.AsSpan().SequenceEqual(ours), "the merged image is not what the device read");
        Assert.Equal((8L << 20, 8L << 20), progress[^1]);
    }

    [Fact]
    public void InPlaceMergeEqualsMergeIntoAndUmlMooInPlace()
    {
        Uml.Require(Uml.Moo);
        using var dir = new ScratchDir();
        var basePath = dir.RandomFile("base.img", 6 << 20, 41);
        var overlay = dir.File("o.cow");
        CowTarget.CreateOverlay(overlay, basePath);
        var model = Scribble(overlay, basePath, 42);
        CowMerge.Merge(overlay, dir.File("into.img"));

        // uml_moo -d merges into the backing file the header names; run it on a copy of both.
        var twin = new ScratchDir();
        using (twin)
        {
            var twinBase = twin.File("base.img");
            File.Copy(basePath, twinBase);
            File.SetLastWriteTimeUtc(twinBase, File.GetLastWriteTimeUtc(basePath));
            var twinOverlay = twin.File("o.cow");
            File.Copy(overlay, twinOverlay);
            Uml.RunOk(Uml.Moo, "-d", "-b", twinBase, twinOverlay); // its getopt wants -d first

            var r = CowMerge.Merge(overlay, null);
            Assert.True(r.InPlace);
            Assert.Equal(basePath, r.Output);
            var merged = File.ReadAllBytes(basePath);
            Assert.True(model.AsSpan().SequenceEqual(merged), "in place merge differs from the device's data");
            Assert.True(merged.AsSpan().SequenceEqual(File.ReadAllBytes(dir.File("into.img"))));
            Assert.True(merged.AsSpan().SequenceEqual(File.ReadAllBytes(twinBase)), "in place merge differs from uml_moo -d");
        }

        // The backing file changed, so the overlay now needs the override; merging again changes nothing.
        // The header keeps mtime in whole seconds: a merge within the overlay's second would look
        // unchanged, so make the change visible the way a later write would.
        File.SetLastWriteTimeUtc(basePath, File.GetLastWriteTimeUtc(basePath).AddSeconds(10));
        Assert.Throws<CowBackingMismatchException>(() => CowMerge.Merge(overlay, null));
        CowMerge.Merge(overlay, null, new CowOpenOptions { IgnoreBackingMismatch = true });
        Assert.True(model.AsSpan().SequenceEqual(File.ReadAllBytes(basePath)));
    }

    [Fact]
    public void MergeRefusesAnExistingOutputAndLeavesNoPartialFile()
    {
        using var dir = new ScratchDir();
        var basePath = dir.RandomFile("base.img", 1 << 20, 5);
        var overlay = dir.File("o.cow");
        CowTarget.CreateOverlay(overlay, basePath);
        File.WriteAllText(dir.File("exists.img"), "x");
        var e = Assert.ThrowsAny<IOException>(() => CowMerge.Merge(overlay, dir.File("exists.img")));
        Assert.Contains("already exists", e.Message, StringComparison.Ordinal);
        Assert.Equal("x", File.ReadAllText(dir.File("exists.img")));

        File.SetLastWriteTimeUtc(basePath, DateTime.UtcNow.AddDays(-3));
        Assert.Throws<CowBackingMismatchException>(() => CowMerge.Merge(overlay, dir.File("new.img")));
        Assert.False(File.Exists(dir.File("new.img")));
    }

    [Fact]
    public void MergeKeepsAnOddSizedTail()
    {
        // uml_moo drops a last partial sector; cow merge keeps the backing file's exact size.
        using var dir = new ScratchDir();
        var basePath = dir.RandomFile("base.img", 1_000_000, 6);
        var overlay = dir.File("o.cow");
        CowTarget.CreateOverlay(overlay, basePath);
        var tail = new byte[512];
        new Random(1).NextBytes(tail);
        using (var t = new CowTarget(overlay))
        {
            Assert.Equal(512, t.Write(tail, 1953 * 512));
        }
        CowMerge.Merge(overlay, dir.File("m.img"));
        var m = File.ReadAllBytes(dir.File("m.img"));
        Assert.Equal(1_000_000, m.Length);
        Assert.Equal(tail[..64], m[(1953 * 512)..]);
        Assert.Equal(File.ReadAllBytes(basePath)[..(1953 * 512)], m[..(1953 * 512)]);
    }
}
