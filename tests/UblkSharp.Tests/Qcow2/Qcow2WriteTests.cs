using System.Buffers.Binary;
using UblkSharp.Targets.Qcow2;
using UblkSharp.Tests.Cow;

namespace UblkSharp.Tests.Qcow2;

/// <summary>Writes through <see cref="Qcow2Target"/>, judged by `qemu-img check` and `qemu-img convert`.</summary>
public class Qcow2WriteTests
{
    private static readonly Qcow2OpenOptions Writable = new() { Writable = true };

    [Theory]
    [InlineData("cluster_size=4096", "8M", 300)]
    [InlineData("cluster_size=65536", "32M", 200)]
    [InlineData("cluster_size=2097152", "32M", 60)]
    [InlineData("compat=0.10,cluster_size=65536", "16M", 150)]
    [InlineData("compat=0.10,cluster_size=4096", "8M", 200)]
    [InlineData("cluster_size=4096,refcount_bits=1", "8M", 200)]
    [InlineData("cluster_size=4096,refcount_bits=2", "8M", 100)]
    [InlineData("cluster_size=4096,refcount_bits=8", "8M", 100)]
    [InlineData("cluster_size=4096,refcount_bits=32", "8M", 100)]
    [InlineData("cluster_size=4096,refcount_bits=64", "8M", 200)]
    [InlineData("cluster_size=65536,lazy_refcounts=on", "16M", 100)]
    public void RandomWritesCheckCleanAndReadAsQemuReads(string options, string size, int writes)
    {
        using var dir = new ScratchDir();
        var image = Qemu.Create(dir.File("w.qcow2"), size, options);
        byte[] mirror;
        using (var t = new Qcow2Target(image, Writable))
        {
            Assert.False(t.IsReadOnly);
            mirror = new byte[t.Size];
            RandomWrites(t, mirror, new Random(options.GetHashCode(StringComparison.Ordinal)), writes, 1 << 20);
            Qcow2Reads.AssertSame(mirror, ReadAll(t), "our reads after our writes");
        }
        AssertChecksClean(image);
        Qcow2Reads.AssertSame(mirror, Qemu.ReadRaw(image), "qemu-img convert after our writes");
    }

    [Fact]
    public void RefcountBlocksAndTableGrow()
    {
        using var dir = new ScratchDir();
        // 512-byte clusters of 64-bit refcounts: a block counts 64 clusters, the first table 64 blocks (2 MiB of file).
        var image = Qemu.Create(dir.File("g.qcow2"), "12M", "cluster_size=512,refcount_bits=64");
        var before = Header(image);
        byte[] mirror;
        using (var t = new Qcow2Target(image, Writable))
        {
            mirror = new byte[t.Size];
            RandomWrites(t, mirror, new Random(7), 150, 256 << 10);
        }
        var after = Header(image);
        Assert.NotEqual(before.RefcountTableOffset, after.RefcountTableOffset);
        Assert.True(after.RefcountTableClusters > before.RefcountTableClusters, $"table {before.RefcountTableClusters} -> {after.RefcountTableClusters} clusters");
        AssertChecksClean(image);
        Qcow2Reads.AssertSame(mirror, Qemu.ReadRaw(image), "qemu-img convert");
    }

    [Theory]
    [InlineData("cluster_size=65536")]
    [InlineData("cluster_size=4096")]
    [InlineData("compat=0.10,cluster_size=65536")]
    public void PartialClustersCopyTheBackingFile(string options)
    {
        using var dir = new ScratchDir();
        var baseImage = Qemu.Create(dir.File("base.qcow2"), "8M");
        Qemu.RunIo(baseImage, "qcow2", "write -P 0x11 0 3M", "write -P 0x22 5M 2M");
        var top = Qemu.Create(dir.File("top.qcow2"), "8M", options, backing: "base.qcow2");
        var mirror = Qemu.ReadRaw(baseImage);
        using (var t = new Qcow2Target(top, Writable))
        {
            RandomWrites(t, mirror, new Random(3), 120, 200 << 10);
        }
        AssertChecksClean(top);
        Qcow2Reads.AssertSame(mirror, Qemu.ReadRaw(top), "qemu-img convert over the backing file");
    }

    [Theory]
    [InlineData("65536")]
    [InlineData("4096")]
    public void CompressedClustersAreRewrittenAsNormalOnes(string clusterSize)
    {
        using var dir = new ScratchDir();
        var source = dir.File("s.raw");
        var data = new byte[6 << 20];
        var rng = new Random(5);
        for (var i = 0; i < data.Length; i += 4096)
        {
            // Compressible but not uniform: runs of one byte value per 4 KiB.
            data.AsSpan(i, 4096).Fill((byte)rng.Next(256));
        }
        File.WriteAllBytes(source, data);
        var image = dir.File("c.qcow2");
        Qemu.RunImg("convert", "-c", "-O", "qcow2", "-o", $"cluster_size={clusterSize}", source, image);
        var mirror = (byte[])data.Clone();
        using (var t = new Qcow2Target(image, Writable))
        {
            Assert.True(t.CountClusters().Compressed > 0);
            RandomWrites(t, mirror, new Random(9), 150, 128 << 10);
        }
        AssertChecksClean(image);
        Qcow2Reads.AssertSame(mirror, Qemu.ReadRaw(image), "qemu-img convert after rewriting compressed clusters");
    }

    [Theory]
    [InlineData("cluster_size=65536", false)]
    [InlineData("cluster_size=4096", true)]
    [InlineData("cluster_size=65536", true)]
    [InlineData("compat=0.10,cluster_size=4096", false)]
    [InlineData("compat=0.10,cluster_size=65536", true)]
    public void WriteZeroesAndDiscardCheckClean(string options, bool backing)
    {
        using var dir = new ScratchDir();
        string? baseName = null;
        var mirror = new byte[8 << 20];
        if (backing)
        {
            var baseImage = Qemu.Create(dir.File("base.qcow2"), "8M");
            Qemu.RunIo(baseImage, "qcow2", "write -P 0x33 0 8M");
            mirror = Qemu.ReadRaw(baseImage);
            baseName = "base.qcow2";
        }
        var image = Qemu.Create(dir.File("z.qcow2"), "8M", options, backing: baseName);
        var rng = new Random(11);
        using (var t = new Qcow2Target(image, Writable))
        {
            RandomWrites(t, mirror, rng, 60, 512 << 10);
            for (var i = 0; i < 80; i++)
            {
                var offset = rng.Next((int)(t.Size / 512)) * 512L;
                var length = Math.Min(rng.Next(1, 4096) * 512L, t.Size - offset);
                var r = (i % 3) switch
                {
                    0 => t.Discard(offset, length),
                    1 => t.WriteZeroes(offset, length, mayUnmap: true),
                    _ => t.WriteZeroes(offset, length, mayUnmap: false),
                };
                Assert.Equal(0, r);
                mirror.AsSpan((int)offset, (int)length).Clear();
                if (i % 4 == 0)
                {
                    RandomWrites(t, mirror, rng, 5, 256 << 10);
                }
            }
            Assert.Equal(0, t.WriteZeroes(0, t.Size, mayUnmap: true));
            mirror.AsSpan().Clear();
            RandomWrites(t, mirror, rng, 20, 256 << 10);
            Qcow2Reads.AssertSame(mirror, ReadAll(t), "our reads after zeroing");
        }
        AssertChecksClean(image);
        Qcow2Reads.AssertSame(mirror, Qemu.ReadRaw(image), "qemu-img convert after zeroing");
    }

    [Fact]
    public void QemuIoWritesOverOursReadBack()
    {
        using var dir = new ScratchDir();
        var image = Qemu.Create(dir.File("q.qcow2"), "8M", "cluster_size=4096");
        using (var t = new Qcow2Target(image, Writable))
        {
            var mirror = new byte[t.Size];
            RandomWrites(t, mirror, new Random(13), 100, 256 << 10);
        }
        Qemu.RunIo(image, "qcow2", "write -P 0x77 100k 300k", "write -z 1M 64k", "discard 2M 128k", "write -P 0x78 7M 1M");
        AssertChecksClean(image);
        var expected = Qemu.ReadRaw(image);
        using (var t = new Qcow2Target(image))
        {
            Qcow2Reads.AssertSame(expected, ReadAll(t), "our reads after qemu-io's writes over ours");
        }
        // And writable again over what qemu wrote.
        using (var t = new Qcow2Target(image, Writable))
        {
            RandomWrites(t, expected, new Random(14), 50, 128 << 10);
        }
        AssertChecksClean(image);
        Qcow2Reads.AssertSame(expected, Qemu.ReadRaw(image), "qemu-img convert");
    }

    /// <summary>
    /// Crash ordering: every pwrite and fdatasync of a session is recorded; a crash at a cut point
    /// keeps every write before the last sync before it and any subset of the writes after that
    /// sync (what a disk may have kept); `qemu-img check` must find no corruption (leaks allowed).
    /// </summary>
    [Theory]
    [InlineData("cluster_size=512,refcount_bits=64", false)]
    [InlineData("cluster_size=4096,refcount_bits=1", true)]
    [InlineData("compat=0.10,cluster_size=4096", true)]
    [InlineData("compressed", false)]
    public void ACrashAtAnyPointLeavesNoCorruption(string options, bool backing)
    {
        using var dir = new ScratchDir();
        string? baseName = null;
        if (backing)
        {
            var baseImage = Qemu.Create(dir.File("base.qcow2"), "4M");
            Qemu.RunIo(baseImage, "qcow2", "write -P 0x44 0 4M");
            baseName = "base.qcow2";
        }
        string image;
        if (options == "compressed")
        {
            // Every write over a compressed cluster frees it: the free path's order is tested too.
            var source = dir.File("s.raw");
            var data = new byte[4 << 20];
            for (var i = 0; i < data.Length; i += 4096)
            {
                data.AsSpan(i, 4096).Fill((byte)(i / 4096));
            }
            File.WriteAllBytes(source, data);
            image = dir.File("c.qcow2");
            Qemu.RunImg("convert", "-c", "-O", "qcow2", "-o", "cluster_size=4096", source, image);
        }
        else
        {
            image = Qemu.Create(dir.File("c.qcow2"), "4M", options, backing: baseName);
        }
        var original = File.ReadAllBytes(image);
        var log = new RecordingLog();
        var rng = new Random(17);
        using (var t = new Qcow2Target(image, Writable))
        {
            t.WriteLog = log;
            var mirror = new byte[t.Size];
            for (var i = 0; i < 6; i++)
            {
                RandomWrites(t, mirror, rng, 15, 96 << 10);
                var offset = rng.Next((int)(t.Size / 512)) * 512L;
                Assert.Equal(0, t.Discard(offset, Math.Min(rng.Next(1, 512) * 512L, t.Size - offset)));
            }
        }
        AssertChecksClean(image);
        var syncs = log.Ops.Count(o => o.Data is null);
        if (options.Contains("cluster_size=512", StringComparison.Ordinal))
        {
            // The refcount table grew: the header's refcount_table_offset and _clusters were switched.
            Assert.Contains(log.Ops, o => o.Offset == 48 && o.Data is { Length: 12 });
        }
        Assert.True(syncs > 20, $"only {syncs} syncs");
        var copy = dir.File("crash.qcow2");
        // Random cuts keeping a random subset of the unsynced writes, then adversarial ones keeping
        // only the last write before the cut (every header write among them: the table switches).
        var cuts = new List<(int At, bool OnlyLast)>();
        for (var cut = 0; cut < 30; cut++)
        {
            cuts.Add((cut == 0 ? log.Ops.Count : rng.Next(log.Ops.Count), false));
        }
        var writes = Enumerable.Range(0, log.Ops.Count).Where(i => log.Ops[i].Data is not null).ToList();
        for (var cut = 0; cut < 20; cut++)
        {
            cuts.Add((writes[rng.Next(writes.Count)] + 1, true));
        }
        cuts.AddRange(writes.Where(i => log.Ops[i].Offset < 512).Select(i => (i + 1, true)));
        // Table entries synced at once (a new refcount block linked): the block before it must have been synced too.
        var linked = writes.Where(i => log.Ops[i].Data!.Length == 8 && i + 1 < log.Ops.Count && log.Ops[i + 1].Data is null).ToList();
        for (var cut = 0; cut < 25 && linked.Count > 0; cut++)
        {
            cuts.Add((linked[rng.Next(linked.Count)] + 1, true));
        }
        foreach (var (at, onlyLast) in cuts)
        {
            var lastSync = log.Ops.FindLastIndex(at == 0 ? 0 : at - 1, at, o => o.Data is null);
            using (var f = new FileStream(copy, FileMode.Create, FileAccess.Write))
            {
                f.Write(original);
                for (var i = 0; i < at; i++)
                {
                    var (offset, data) = log.Ops[i];
                    // After the last sync, the disk may have kept any of the writes.
                    if (data is null || (i > lastSync && (onlyLast ? i != at - 1 : rng.Next(2) == 0)))
                    {
                        continue;
                    }
                    f.Position = offset;
                    f.Write(data);
                }
            }
            var (code, _, output) = Qemu.Run(Qemu.Img, ["check", copy]);
            Assert.True(code is 0 or 3, $"cut at op {at} of {log.Ops.Count} (last sync {lastSync}, only the last write kept: {onlyLast}): qemu-img check exited {code}: {output}");
        }
    }

    [Fact]
    public void ConcurrentWritersShareClustersSafely()
    {
        using var dir = new ScratchDir();
        var baseImage = Qemu.Create(dir.File("base.qcow2"), "8M");
        Qemu.RunIo(baseImage, "qcow2", "write -P 0x55 0 8M");
        var image = Qemu.Create(dir.File("p.qcow2"), "8M", "cluster_size=65536", backing: "base.qcow2");
        var mirror = Qemu.ReadRaw(baseImage);
        const int Stripe = 4096;
        using (var t = new Qcow2Target(image, Writable))
        {
            // Four writers, each owning every fourth 4 KiB stripe: they meet in every cluster.
            var failures = 0;
            var threads = Enumerable.Range(0, 4).Select(k => new Thread(() =>
            {
                var rng = new Random(100 + k);
                var buf = new byte[Stripe];
                for (var i = 0; i < 400; i++)
                {
                    var stripe = (rng.Next((int)(t.Size / Stripe) / 4) * 4) + k;
                    rng.NextBytes(buf);
                    if (t.Write(buf, (long)stripe * Stripe) != Stripe)
                    {
                        Interlocked.Increment(ref failures);
                    }
                    lock (mirror)
                    {
                        buf.CopyTo(mirror, stripe * Stripe);
                    }
                }
            })).ToList();
            threads.ForEach(th => th.Start());
            threads.ForEach(th => th.Join());
            Assert.Equal(0, failures);
        }
        AssertChecksClean(image);
        Qcow2Reads.AssertSame(mirror, Qemu.ReadRaw(image), "qemu-img convert after concurrent writers");
    }

    [Fact]
    public void SteadyStateWritesAllocateNothing()
    {
        using var dir = new ScratchDir();
        var image = Qemu.Create(dir.File("a.qcow2"), "4M", "cluster_size=65536");
        using var t = new Qcow2Target(image, Writable);
        var buf = new byte[128 << 10];
        buf.AsSpan().Fill(0x5c);
        var bad = 0;
        void Pass()
        {
            for (long off = 0; off < t.Size; off += buf.Length)
            {
                bad += t.Write(buf, off) == buf.Length ? 0 : 1;
                bad += t.Write(buf.AsSpan(0, 4096), off + 512) == 4096 ? 0 : 1;
            }
        }
        Pass(); // allocates every cluster
        Pass(); // warm
        var before = GC.GetAllocatedBytesForCurrentThread();
        for (var i = 0; i < 10; i++)
        {
            Pass();
        }
        var allocated = GC.GetAllocatedBytesForCurrentThread() - before;
        Assert.Equal(0, bad);
        Assert.Equal(0, allocated);
    }

    [Fact]
    public void RefusesToWriteWhatItCannotWriteSafely()
    {
        using var dir = new ScratchDir();
        var dirty = Qemu.Create(dir.File("dirty.qcow2"), "1M", "lazy_refcounts=on");
        SetIncompatibleBits(dirty, Qcow2Header.DirtyBit);
        Assert.Contains($"repair it with `qemu-img check -r all {dirty}`", Refused(dirty), StringComparison.Ordinal);
        using (var ro = new Qcow2Target(dirty))
        {
            Assert.True(ro.IsReadOnly);
        }

        var corrupt = Qemu.Create(dir.File("corrupt.qcow2"), "1M");
        SetIncompatibleBits(corrupt, Qcow2Header.CorruptBit);
        Assert.Contains("is marked corrupt", Refused(corrupt), StringComparison.Ordinal);

        var extended = Qemu.Create(dir.File("ext.qcow2"), "1M", "extended_l2=on");
        Assert.Contains("has extended L2 entries", Refused(extended), StringComparison.Ordinal);

        var snap = Qemu.Create(dir.File("snap.qcow2"), "1M");
        Qemu.RunIo(snap, "qcow2", "write -P 1 0 64k");
        Qemu.RunImg("snapshot", "-c", "s1", snap);
        Assert.Contains("has 1 internal snapshot(s)", Refused(snap), StringComparison.Ordinal);
        Assert.Contains("an internal snapshot is served read-only", Refused(snap, "s1"), StringComparison.Ordinal);

        // Nothing was changed by a refused open.
        AssertChecksClean(snap);
        AssertChecksClean(extended);
    }

    [Fact]
    public void PersistentBitmapsAreRefusedOtherAutoclearBitsCleared()
    {
        using var dir = new ScratchDir();
        var image = Qemu.Create(dir.File("bm.qcow2"), "4M");
        Qemu.RunImg("bitmap", "--add", image, "b0");
        Assert.Equal(1ul, Autoclear(image));
        Assert.Contains("qemu-img bitmap --remove", Refused(image), StringComparison.Ordinal);
        Assert.Equal(1ul, Autoclear(image));

        // An autoclear bit this writer does not know: cleared before the first write, as the spec asks.
        var other = Qemu.Create(dir.File("other.qcow2"), "4M");
        SetHeaderBits(other, 88, 1ul << 5);
        var mirror = new byte[4 << 20];
        using (var t = new Qcow2Target(other, Writable))
        {
            RandomWrites(t, mirror, new Random(23), 20, 64 << 10);
        }
        Assert.Equal(0ul, Autoclear(other));
        AssertChecksClean(other);
        Qcow2Reads.AssertSame(mirror, Qemu.ReadRaw(other), "qemu-img convert");
    }

    [Fact]
    public void ReadOnlyTargetsRefuseWrites()
    {
        using var dir = new ScratchDir();
        var image = Qemu.Create(dir.File("a.qcow2"), "1M");
        using var t = new Qcow2Target(image);
        Assert.True(t.IsReadOnly);
        Assert.False(t.CanDiscard);
        Assert.Equal(-UblkSharp.Interop.Errno.EROFS, t.Write(new byte[512], 0));
        Assert.Equal(-UblkSharp.Interop.Errno.EROFS, t.Discard(0, 512));
    }

    internal static void RandomWrites(Qcow2Target t, byte[] mirror, Random rng, int count, int maxLength)
    {
        var sectors = (int)(Math.Min(t.Size, mirror.Length) / 512);
        var buf = new byte[maxLength];
        for (var i = 0; i < count; i++)
        {
            var start = rng.Next(sectors);
            var n = Math.Min(rng.Next(1, (maxLength / 512) + 1), sectors - start);
            var data = buf.AsSpan(0, n * 512);
            rng.NextBytes(data);
            var r = t.Write(data, start * 512L);
            Assert.True(r == data.Length, $"write of {data.Length} at {start * 512L} returned {r}");
            data.CopyTo(mirror.AsSpan(start * 512));
        }
    }

    private static byte[] ReadAll(Qcow2Target t)
    {
        var got = new byte[t.Size];
        Assert.Equal(got.Length, t.Read(got, 0));
        return got;
    }

    private static void AssertChecksClean(string image)
    {
        var (code, _, output) = Qemu.Run(Qemu.Img, ["check", image]);
        Assert.True(code == 0, $"qemu-img check {image} exited {code}: {output}");
    }

    private static Qcow2Header Header(string image)
    {
        using var t = new Qcow2Target(image);
        return t.Header;
    }

    private static ulong Autoclear(string image)
    {
        using var f = new FileStream(image, FileMode.Open, FileAccess.Read);
        var b = new byte[8];
        f.Position = 88;
        f.ReadExactly(b);
        return BinaryPrimitives.ReadUInt64BigEndian(b);
    }

    private static void SetIncompatibleBits(string image, ulong bits) => SetHeaderBits(image, 72, bits);

    private static void SetHeaderBits(string image, int at, ulong bits)
    {
        using var f = new FileStream(image, FileMode.Open, FileAccess.ReadWrite);
        var b = new byte[8];
        f.Position = at;
        f.ReadExactly(b);
        BinaryPrimitives.WriteUInt64BigEndian(b, BinaryPrimitives.ReadUInt64BigEndian(b) | bits);
        f.Position = at;
        f.Write(b);
    }

    private static string Refused(string image, string? snapshot = null)
        => Assert.Throws<Qcow2FormatException>(() => new Qcow2Target(image, new Qcow2OpenOptions { Writable = true, Snapshot = snapshot }).Dispose()).Message;

    private sealed class RecordingLog : IQcow2WriteLog
    {
        public List<(long Offset, byte[]? Data)> Ops { get; } = [];

        public void Write(long offset, ReadOnlySpan<byte> data)
        {
            lock (Ops)
            {
                Ops.Add((offset, data.ToArray()));
            }
        }

        public void Sync()
        {
            lock (Ops)
            {
                Ops.Add((0, null));
            }
        }
    }
}

/// <summary><see cref="Qcow2Target.Create"/> and the factory's --create: images qemu-img checks clean and reads as written.</summary>
public class Qcow2CreateTests
{
    [Theory]
    [InlineData(64L << 20, 16)]
    [InlineData((5L << 30) + 512, 16)]
    [InlineData(3L << 20, 12)]
    [InlineData(1L << 20, 9)]
    public void MakesAnImageQemuAccepts(long size, int clusterBits)
    {
        using var dir = new ScratchDir();
        var image = dir.File("new.qcow2");
        Qcow2Target.Create(image, size, clusterBits: clusterBits);
        var (code, _, output) = Qemu.Run(Qemu.Img, ["check", image]);
        Assert.True(code == 0, $"qemu-img check exited {code}: {output}");
        var info = Qemu.RunImg("info", "--output=json", image);
        Assert.Contains($"\"virtual-size\": {size}", info, StringComparison.Ordinal);
        Assert.Contains($"\"cluster-size\": {1 << clusterBits}", info, StringComparison.Ordinal);
        Assert.Contains("\"compat\": \"1.1\"", info, StringComparison.Ordinal);
        using (var t = new Qcow2Target(image, new Qcow2OpenOptions { Writable = true }))
        {
            var mirror = new byte[Math.Min(t.Size, 4 << 20)];
            Qcow2WriteTests.RandomWrites(t, mirror, new Random(21), 40, 128 << 10);
        }
        (code, _, output) = Qemu.Run(Qemu.Img, ["check", image]);
        Assert.True(code == 0, $"qemu-img check after writes exited {code}: {output}");
        Assert.Throws<IOException>(() => Qcow2Target.Create(image, size));
    }

    [Fact]
    public void TheFactoryCreatesOverABackingFile()
    {
        using var dir = new ScratchDir();
        var baseImage = Qemu.Create(dir.File("base.qcow2"), "6M");
        Qemu.RunIo(baseImage, "qcow2", "write -P 0x66 0 6M");
        var rawBase = dir.RandomFile("base.raw", 2 << 20, 4);
        var image = dir.File("top.qcow2");
        using (var t = UblkSharp.Targets.TargetFactory.Create("qcow2", new Dictionary<string, string> { ["file"] = image, ["create"] = "on", ["backing"] = "base.qcow2" }))
        {
            Assert.Equal(6 << 20, t.Size);
            Assert.Equal(new Dictionary<string, string> { ["file"] = image }, t.Recipe);
            Assert.Equal(512, t.Write(new byte[512], 4096));
        }
        var mirror = Qemu.ReadRaw(baseImage);
        mirror.AsSpan(4096, 512).Clear();
        var (code, _, output) = Qemu.Run(Qemu.Img, ["check", image]);
        Assert.True(code == 0, $"qemu-img check exited {code}: {output}");
        Assert.Contains("\"backing-filename-format\": \"qcow2\"", Qemu.RunImg("info", "--output=json", image), StringComparison.Ordinal);
        Qcow2Reads.AssertSame(mirror, Qemu.ReadRaw(image), "qemu-img convert of the new overlay");

        var overRaw = dir.File("over-raw.qcow2");
        UblkSharp.Targets.TargetFactory.Create("qcow2", new Dictionary<string, string> { ["file"] = overRaw, ["create"] = "on", ["backing"] = rawBase, ["size"] = "4M" }).Dispose();
        Assert.Contains("\"backing-filename-format\": \"raw\"", Qemu.RunImg("info", "--output=json", overRaw), StringComparison.Ordinal);
        var expected = new byte[4 << 20];
        File.ReadAllBytes(rawBase).CopyTo(expected, 0);
        Qcow2Reads.AssertSame(expected, Qemu.ReadRaw(overRaw), "qemu-img convert over a raw backing file");

        var e = Assert.Throws<ArgumentException>(() => UblkSharp.Targets.TargetFactory.Create("qcow2", new Dictionary<string, string> { ["file"] = image, ["create"] = "on", ["size"] = "1M" }));
        Assert.Contains("never overwrites", e.Message, StringComparison.Ordinal);
        e = Assert.Throws<ArgumentException>(() => UblkSharp.Targets.TargetFactory.Create("qcow2", new Dictionary<string, string> { ["file"] = dir.File("n.qcow2"), ["create"] = "on" }));
        Assert.Contains("needs --size", e.Message, StringComparison.Ordinal);
    }
}
