using UblkSharp.Interop;
using UblkSharp.Targets;
using UblkSharp.Targets.Cow;

namespace UblkSharp.Tests.Cow;

public class CowTargetTests
{
    private const long BaseSize = 4 << 20;

    private static (ScratchDir Dir, string Base, string Overlay) NewOverlay(long size = BaseSize, int seed = 11)
    {
        var dir = new ScratchDir();
        var basePath = dir.RandomFile("base.img", size, seed);
        var overlay = dir.File("over.cow");
        CowTarget.CreateOverlay(overlay, basePath);
        return (dir, basePath, overlay);
    }

    private static byte[] Pattern(int length, int seed)
    {
        var b = new byte[length];
        new Random(seed).NextBytes(b);
        return b;
    }

    [Fact]
    public void NewOverlayReadsTheBackingFile()
    {
        var (dir, basePath, overlay) = NewOverlay();
        using (dir)
        {
            using var t = new CowTarget(overlay);
            Assert.Equal(BaseSize, t.Size);
            Assert.Equal("cow", t.Kind);
            Assert.Equal(512, t.LogicalBlockSize);
            Assert.False(t.IsReadOnly);
            Assert.True(t.HasVolatileCache);
            Assert.True(t.CanDiscard);
            Assert.Equal(File.ReadAllBytes(basePath), CowFiles.ReadAll(t));
            Assert.Equal(0, t.CowSectors);
            Assert.Equal(overlay, t.Recipe["file"]);
        }
    }

    [Fact]
    public void AWritableOverlaySurvivesAHandOverButNotACrash()
    {
        var (dir, _, overlay) = NewOverlay();
        using (dir)
        {
            // Bits set since the last write-back are in memory only: a crash loses them, Dispose writes them.
            using (var t = new CowTarget(overlay))
            {
                Assert.False(t.SurvivesRestart);
                Assert.True(t.SurvivesHandOver);
            }
            using (var ro = new CowTarget(overlay, new CowOpenOptions { ReadOnly = true }))
            {
                Assert.True(ro.SurvivesRestart);
                Assert.True(ro.SurvivesHandOver);
            }
        }
    }

    [Fact]
    public void ReadsSplitBetweenCowAndBacking()
    {
        var (dir, basePath, overlay) = NewOverlay();
        using (dir)
        {
            var model = File.ReadAllBytes(basePath);
            var original = File.ReadAllBytes(basePath);
            using var t = new CowTarget(overlay);
            // Every other sector of a region, plus a run: reads across them alternate files.
            for (var s = 100; s < 140; s += 2)
            {
                var d = Pattern(512, s);
                Assert.Equal(512, t.Write(d, s * 512L));
                d.CopyTo(model, s * 512);
            }
            var run = Pattern(64 * 1024, 7);
            Assert.Equal(run.Length, t.Write(run, 1 << 20));
            run.CopyTo(model, 1 << 20);

            var rng = new Random(9);
            for (var i = 0; i < 500; i++)
            {
                var off = rng.NextInt64(BaseSize - 200_000);
                var len = rng.Next(1, 200_000);
                var buf = new byte[len];
                Assert.Equal(len, t.Read(buf, off));
                Assert.True(model.AsSpan((int)off, len).SequenceEqual(buf), $"read {len} at {off}");
            }
            Assert.Equal(model, CowFiles.ReadAll(t));
            // The backing file is never written.
            Assert.Equal(original, File.ReadAllBytes(basePath));
        }
    }

    [Fact]
    public void WritesSurviveReopenAndLandWhereUmlLooksForThem()
    {
        var (dir, basePath, overlay) = NewOverlay();
        using (dir)
        {
            var baseBytes = File.ReadAllBytes(basePath);
            var model = (byte[])baseBytes.Clone();
            var rng = new Random(21);
            using (var t = new CowTarget(overlay))
            {
                for (var i = 0; i < 300; i++)
                {
                    var sectors = rng.Next(1, 64);
                    var off = rng.NextInt64((BaseSize / 512) - sectors) * 512;
                    var d = Pattern(sectors * 512, i);
                    Assert.Equal(d.Length, t.Write(d, off));
                    d.CopyTo(model, off);
                    if (i % 50 == 0)
                    {
                        Assert.Equal(0, t.Flush());
                    }
                }
            }
            Assert.Equal(baseBytes, File.ReadAllBytes(basePath));

            // On disk: bit s set exactly where the model differs from the base (or was written), data at DataOffset + offset.
            var h = CowTarget.ReadHeader(overlay);
            var file = File.ReadAllBytes(overlay);
            var bitmap = file.AsSpan((int)h.BitmapOffset, (int)h.BitmapLength);
            for (var s = 0; s < BaseSize / 512; s++)
            {
                var bit = (bitmap[s / 8] & (1 << (s % 8))) != 0;
                var fromFile = bit ? file.AsSpan((int)h.DataOffset + (s * 512), 512) : baseBytes.AsSpan(s * 512, 512);
                Assert.True(model.AsSpan(s * 512, 512).SequenceEqual(fromFile), $"sector {s} (bit {bit})");
            }

            using var again = new CowTarget(overlay);
            Assert.Equal(model, CowFiles.ReadAll(again));
        }
    }

    [Fact]
    public void DiscardAndWriteZeroesReadAsZeros()
    {
        var (dir, basePath, overlay) = NewOverlay();
        using (dir)
        {
            var model = File.ReadAllBytes(basePath);
            using (var t = new CowTarget(overlay))
            {
                var d = Pattern(8192, 1);
                Assert.Equal(8192, t.Write(d, 65536));
                d.CopyTo(model, 65536);
                Assert.Equal(0, t.Discard(65536 + 1024, 4096));       // over COW data
                Array.Clear(model, 65536 + 1024, 4096);
                Assert.Equal(0, t.Discard(512 * 1000, 512 * 9));       // over backing data
                Array.Clear(model, 512 * 1000, 512 * 9);
                Assert.Equal(0, t.WriteZeroes(1 << 20, 1 << 20, mayUnmap: false));
                Array.Clear(model, 1 << 20, 1 << 20);
                Assert.Equal(0, t.WriteZeroes(3 << 20, 3 * 4096, mayUnmap: true));
                Array.Clear(model, 3 << 20, 3 * 4096);
                Assert.Equal(model, CowFiles.ReadAll(t));
            }
            using var again = new CowTarget(overlay);
            Assert.Equal(model, CowFiles.ReadAll(again));
        }
    }

    [Fact]
    public void ConcurrentWritersToNeighbouringSectorsLoseNoBit()
    {
        var (dir, _, overlay) = NewOverlay(1 << 20);
        using (dir)
        {
            const int threads = 8;
            const int sectors = (1 << 20) / 512;
            using (var t = new CowTarget(overlay))
            {
                // Thread k writes sectors k, k+8, ...: all of them share every bitmap word.
                Parallel.For(0, threads, new ParallelOptions { MaxDegreeOfParallelism = threads }, k =>
                {
                    for (var s = k; s < sectors; s += threads)
                    {
                        var d = new byte[512];
                        BitConverter.TryWriteBytes(d, s + 1);
                        Assert.Equal(512, t.Write(d, s * 512L));
                        if (s % 97 == 0)
                        {
                            Assert.Equal(0, t.Flush());
                        }
                    }
                });
                Assert.Equal(sectors, t.CowSectors);
            }
            using var again = new CowTarget(overlay, new CowOpenOptions { ReadOnly = true });
            Assert.Equal(sectors, again.CowSectors);
            var all = CowFiles.ReadAll(again);
            for (var s = 0; s < sectors; s++)
            {
                Assert.Equal(s + 1, BitConverter.ToInt32(all, s * 512));
            }
        }
    }

    [Fact]
    public void BitmapWritebackPersistsBitsWithoutAFlush()
    {
        var (dir, _, overlay) = NewOverlay(1 << 20);
        using (dir)
        {
            using var t = new CowTarget(overlay, new CowOpenOptions { BitmapWriteback = TimeSpan.FromMilliseconds(50) });
            Assert.Equal(4096, t.Write(Pattern(4096, 3), 8192));
            var h = t.Header;
            var deadline = DateTime.UtcNow.AddSeconds(60);
            byte first;
            do
            {
                Thread.Sleep(20);
                using var fs = new FileStream(overlay, FileMode.Open, FileAccess.Read, FileShare.ReadWrite);
                fs.Position = h.BitmapOffset + 2;
                first = (byte)fs.ReadByte();
            }
            while (first != 0xff && DateTime.UtcNow < deadline);
            Assert.Equal(0xff, first); // sectors 16..23
        }
    }

    /// <summary>
    /// By default no writeback round comes within seconds (it would fdatasync all the overlay's
    /// dirty data, as often as it runs: at 1 s it cost random writes half their speed); "writeback"
    /// sets the interval and is recorded, and a bad one is refused.
    /// </summary>
    [Fact]
    public void TheWritebackIntervalIsThirtySecondsByDefaultAndCanBeSet()
    {
        var (dir, _, overlay) = NewOverlay(1 << 20);
        using (dir)
        {
            // A new stream each time: a FileStream's buffer would keep showing the first read.
            byte OnDisk(CowTarget t, int index)
            {
                using var fs = new FileStream(overlay, FileMode.Open, FileAccess.Read, FileShare.ReadWrite);
                fs.Position = t.Header.BitmapOffset + index;
                return (byte)fs.ReadByte();
            }
            using (var t = (CowTarget)TargetFactory.Create("cow", new Dictionary<string, string> { ["file"] = overlay }))
            {
                Assert.Equal(TimeSpan.FromSeconds(30), CowOpenOptions.DefaultBitmapWriteback);
                Assert.False(t.Recipe.ContainsKey("writeback"));
                Assert.Equal(4096, t.Write(Pattern(4096, 3), 8192));
                Thread.Sleep(2500);
                Assert.Equal(0, OnDisk(t, 2)); // sectors 16..23: not yet written back
            }
            Assert.Equal(0xff, File.ReadAllBytes(overlay)[(int)CowTarget.ReadHeader(overlay).BitmapOffset + 2]); // close persists them
            using (var t = (CowTarget)TargetFactory.Create("cow", new Dictionary<string, string> { ["file"] = overlay, ["writeback"] = "0.05" }))
            {
                Assert.Equal("0.05", t.Recipe["writeback"]);
                Assert.Equal(4096, t.Write(Pattern(4096, 4), 16384));
                var deadline = DateTime.UtcNow.AddSeconds(60);
                while (OnDisk(t, 4) != 0xff && DateTime.UtcNow < deadline)
                {
                    Thread.Sleep(20);
                }
                Assert.Equal(0xff, OnDisk(t, 4)); // sectors 32..39, without a flush
            }
            foreach (var bad in new[] { "-1", "soon", "100000" })
            {
                var e = Assert.Throws<ArgumentException>(() => TargetFactory.Create("cow", new Dictionary<string, string> { ["file"] = overlay, ["writeback"] = bad }).Dispose());
                Assert.Equal($"--writeback {bad}: give the seconds between bitmap writeback rounds, e.g. 30, or 0 for only on flush", e.Message);
            }
        }
    }

    [Fact]
    public void RefusesUnalignedAndOutOfRangeWritesAndWritesWhenReadOnly()
    {
        var (dir, _, overlay) = NewOverlay(1 << 20);
        using (dir)
        {
            using (var t = new CowTarget(overlay))
            {
                Assert.Equal(-Errno.EINVAL, t.Write(new byte[100], 0));
                Assert.Equal(-Errno.EINVAL, t.Write(new byte[512], 100));
                Assert.Equal(-Errno.EINVAL, t.Write(new byte[512], 1 << 20));
                Assert.Equal(-Errno.EINVAL, t.Read(new byte[512], 1 << 20));
                // Reads need no alignment.
                Assert.Equal(100, t.Read(new byte[100], 7));
            }
            using var ro = new CowTarget(overlay, new CowOpenOptions { ReadOnly = true });
            Assert.True(ro.IsReadOnly);
            Assert.Equal(-Errno.EROFS, ro.Write(new byte[512], 0));
            Assert.Equal(-Errno.EROFS, ro.Discard(0, 512));
            Assert.Equal("on", ro.Recipe["read-only"]);
        }
    }

    [Fact]
    public void BackingSizeOrMtimeMismatchIsRefusedClearlyUnlessOverridden()
    {
        var (dir, basePath, overlay) = NewOverlay(1 << 20);
        using (dir)
        {
            File.SetLastWriteTimeUtc(basePath, new DateTime(2020, 1, 2, 3, 4, 5, DateTimeKind.Utc));
            var e = Assert.Throws<CowBackingMismatchException>(() => new CowTarget(overlay).Dispose());
            Assert.Contains("was modified at 2020-01-02 03:04:05 UTC (1577934245), but the COW header says", e.Message, StringComparison.Ordinal);
            Assert.Contains("--ignore-backing-mismatch", e.Message, StringComparison.Ordinal);

            using (var fs = new FileStream(basePath, FileMode.Open))
            {
                fs.SetLength((1 << 20) + 512);
            }
            e = Assert.Throws<CowBackingMismatchException>(() => new CowTarget(overlay).Dispose());
            Assert.Contains($"is {(1 << 20) + 512} bytes, but the COW header says {1 << 20}", e.Message, StringComparison.Ordinal);

            // Through the factory (the CLI's path): one clear ArgumentException line.
            var ae = Assert.ThrowsAny<ArgumentException>(() => TargetFactory.Create("cow", new Dictionary<string, string> { ["file"] = overlay }).Dispose());
            Assert.Contains("changed since the overlay was made", ae.Message, StringComparison.Ordinal);

            using var t = new CowTarget(overlay, new CowOpenOptions { IgnoreBackingMismatch = true });
            Assert.Equal(1 << 20, t.Size); // the header's geometry
            Assert.Equal(512, t.Write(new byte[512], 0));
            Assert.Equal("on", t.Recipe["ignore-backing-mismatch"]);
        }
    }

    [Fact]
    public void BackingOverrideAndMissingBacking()
    {
        var (dir, basePath, overlay) = NewOverlay(1 << 20);
        using (dir)
        {
            var moved = dir.File("moved.img");
            File.Copy(basePath, moved);
            File.SetLastWriteTimeUtc(moved, File.GetLastWriteTimeUtc(basePath));
            File.Delete(basePath);
            var e = Assert.Throws<FileNotFoundException>(() => new CowTarget(overlay).Dispose());
            Assert.Equal($"{overlay}: its backing file {basePath} does not exist (give the right one with --backing)", e.Message);
            using var t = new CowTarget(overlay, new CowOpenOptions { BackingFile = moved });
            Assert.Equal(moved, t.BackingPath);
            Assert.Equal(File.ReadAllBytes(moved), CowFiles.ReadAll(t));
        }
    }

    [Fact]
    public void AnOverlayInUseIsRefused()
    {
        var (dir, _, overlay) = NewOverlay(1 << 20);
        using (dir)
        {
            using var t = new CowTarget(overlay);
            var e = Assert.ThrowsAny<IOException>(() => new CowTarget(overlay).Dispose());
            Assert.Contains("is in use by another process", e.Message, StringComparison.Ordinal);
        }
    }

    [Fact]
    public void FactoryCreatesAndReopens()
    {
        using var dir = new ScratchDir();
        var basePath = dir.RandomFile("base.img", 1 << 20, 4);
        var overlay = dir.File("new.cow");
        var opts = new Dictionary<string, string> { ["file"] = overlay, ["create"] = "on", ["backing"] = basePath };
        using (var t = TargetFactory.Create("cow", opts))
        {
            Assert.IsType<CowTarget>(t);
            Assert.False(t.Recipe.ContainsKey("create"));
            Assert.Equal(512, t.Write(new byte[512], 0));
        }
        var again = Assert.ThrowsAny<ArgumentException>(() => TargetFactory.Create("cow", opts).Dispose());
        Assert.Contains("already exists", again.Message, StringComparison.Ordinal);
        using (var t = TargetFactory.Create("cow", new Dictionary<string, string> { ["file"] = overlay }))
        {
            Assert.Equal(1, ((CowTarget)t).CowSectors);
        }
        var none = Assert.ThrowsAny<ArgumentException>(() => TargetFactory.Create("cow", new Dictionary<string, string>()).Dispose());
        Assert.StartsWith("the cow target needs its COW file", none.Message, StringComparison.Ordinal);
        var noBacking = Assert.ThrowsAny<ArgumentException>(() => TargetFactory.Create("cow", new Dictionary<string, string> { ["file"] = dir.File("x.cow"), ["create"] = "on" }).Dispose());
        Assert.Contains("--backing", noBacking.Message, StringComparison.Ordinal);
        var notCow = Assert.ThrowsAny<ArgumentException>(() => TargetFactory.Create("cow", new Dictionary<string, string> { ["file"] = basePath }).Dispose());
        Assert.Contains("is not a UML COW file", notCow.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void OddSizedBackingHasARoundedUpLastSector()
    {
        var (dir, basePath, overlay) = NewOverlay(1_000_000);
        using (dir)
        {
            using var t = new CowTarget(overlay);
            Assert.Equal(1954 * 512, t.Size);
            var all = CowFiles.ReadAll(t);
            Assert.Equal(File.ReadAllBytes(basePath), all[..1_000_000]);
            Assert.All(all[1_000_000..], b => Assert.Equal(0, b));
            var d = Pattern(512, 5);
            Assert.Equal(512, t.Write(d, 1953 * 512));
            var back = new byte[512];
            Assert.Equal(512, t.Read(back, 1953 * 512));
            Assert.Equal(d, back);
        }
    }

    [Fact]
    public void UmlMkcowOverlayOpensAndWorks()
    {
        Uml.Require(Uml.MkCow);
        using var dir = new ScratchDir();
        var basePath = dir.RandomFile("base.img", 2 << 20, 8);
        var overlay = dir.File("mk.cow");
        Uml.RunOk(Uml.MkCow, overlay, basePath);
        var model = File.ReadAllBytes(basePath);
        using (var t = new CowTarget(overlay))
        {
            Assert.Equal(model, CowFiles.ReadAll(t));
            var d = Pattern(3 * 4096, 1);
            Assert.Equal(d.Length, t.Write(d, 5 * 4096));
            d.CopyTo(model, 5 * 4096);
        }
        using var again = new CowTarget(overlay);
        Assert.Equal(model, CowFiles.ReadAll(again));
    }
}
