using UblkSharp.Targets.Cow;

namespace UblkSharp.Tests.Cow;

public class CowBitmapTests
{
    [Fact]
    public void BitOrderIsUmls()
    {
        // ubd_set_bit(): bit s % 8 of byte s / 8.
        var b = new CowBitmap(16, 128);
        b.SetRange(0, 1);
        b.SetRange(9, 1);
        b.SetRange(127, 1);
        var bytes = b.Bytes;
        Assert.Equal(0x01, bytes[0]);
        Assert.Equal(0x02, bytes[1]);
        Assert.Equal(0x80, bytes[15]);
        Assert.True(b.Test(9));
        Assert.False(b.Test(8));
    }

    [Fact]
    public void ConcurrentWritersInTheSameWordsLoseNoBit()
    {
        // 8 threads set interleaved single bits, so every word is contended by all of them at once.
        const int threads = 8;
        const long sectors = 1 << 20;
        for (var round = 0; round < 5; round++)
        {
            var b = new CowBitmap(sectors / 8, sectors);
            using var start = new Barrier(threads);
            var workers = Enumerable.Range(0, threads).Select(t => new Thread(() =>
            {
                start.SignalAndWait();
                for (long s = t; s < sectors; s += threads)
                {
                    b.SetRange(s, 1);
                }
            })).ToArray();
            foreach (var w in workers)
            {
                w.Start();
            }
            foreach (var w in workers)
            {
                w.Join();
            }
            Assert.Equal(sectors, b.CountSet());
        }
    }

    [Fact]
    public void ConcurrentRangesAcrossWordBoundariesLoseNoBit()
    {
        const long sectors = 64 * 1024;
        var b = new CowBitmap(sectors / 8, sectors);
        var expected = new bool[sectors];
        var ranges = new List<(long, long)>();
        var rng = new Random(3);
        for (var i = 0; i < 4000; i++)
        {
            var first = rng.NextInt64(sectors - 200);
            var count = rng.Next(1, 200);
            ranges.Add((first, count));
            for (var s = first; s < first + count; s++)
            {
                expected[s] = true;
            }
        }
        Parallel.ForEach(ranges, new ParallelOptions { MaxDegreeOfParallelism = 8 }, r => b.SetRange(r.Item1, r.Item2));
        for (long s = 0; s < sectors; s++)
        {
            Assert.True(expected[s] == b.Test(s), $"sector {s}");
        }
    }

    [Fact]
    public void SetRangeReportsNewBitsAndDirtiesTheirPages()
    {
        var sectors = 5L * CowBitmap.PageBytes * 8;
        var b = new CowBitmap(sectors / 8, sectors);
        Assert.False(b.AnyDirty());
        Assert.True(b.SetRange(CowBitmap.PageBytes * 8 * 2 + 5, 10));
        Assert.False(b.SetRange(CowBitmap.PageBytes * 8 * 2 + 6, 3));
        var pages = new int[256];
        var cursor = 0;
        Assert.Equal(1, b.TakeDirty(pages, ref cursor));
        Assert.Equal(2, pages[0]);
        Assert.False(b.AnyDirty());
        // A range across a page boundary dirties both pages.
        Assert.True(b.SetRange((CowBitmap.PageBytes * 8) - 3, 6));
        cursor = 0;
        Assert.Equal(2, b.TakeDirty(pages, ref cursor));
        Assert.Equal([0, 1], pages[..2]);
        Assert.Equal(CowBitmap.PageBytes, b.PageLength(0));
    }

    [Fact]
    public void BitsSetByAnotherWriterAreMarkedUntilTheyAreInTheFile()
    {
        // A second write to a sector may find its bit set by a first write that has not marked the
        // page yet (or whose mark a persister took before the bit was copied): it marks the page itself.
        var b = new CowBitmap(CowBitmap.PageBytes, CowBitmap.PageBytes * 8);
        var pages = new int[64];
        Assert.True(b.SetRange(5, 1));
        var cursor = 0;
        Assert.Equal(1, b.TakeDirty(pages, ref cursor)); // taken, not yet written
        Assert.False(b.SetRange(5, 1));
        Assert.True(b.AnyDirty());
        cursor = 0;
        Assert.Equal(1, b.TakeDirty(pages, ref cursor));
        var snapshot = new byte[CowBitmap.PageBytes];
        b.CopyPage(0, snapshot);
        b.MarkPersisted(0, snapshot);
        Assert.False(b.SetRange(5, 1));
        Assert.False(b.AnyDirty());
    }

    [Fact]
    public void RunEndMatchesANaiveScan()
    {
        var rng = new Random(5);
        const long sectors = 3000;
        var b = new CowBitmap((sectors + 7) / 8, sectors);
        for (var i = 0; i < 60; i++)
        {
            b.SetRange(rng.NextInt64(sectors - 100), rng.Next(1, 100));
        }
        for (var i = 0; i < 2000; i++)
        {
            var s = rng.NextInt64(sectors);
            var end = Math.Min(sectors, s + rng.Next(1, 400));
            var got = b.RunEnd(s, end, out var set);
            Assert.Equal(b.Test(s), set);
            var want = s;
            while (want < end && b.Test(want) == set)
            {
                want++;
            }
            Assert.Equal(want, got);
        }
    }
}
