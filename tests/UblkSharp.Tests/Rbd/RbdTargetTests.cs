using UblkSharp.Interop;
using UblkSharp.Targets;
using UblkSharp.Tests.Targets;

namespace UblkSharp.Tests.Rbd;

/// <summary>The rbd target's synchronous methods (what the NBD export calls) on a real cluster.</summary>
[Collection(nameof(CephCollection))]
public class RbdTargetTests(CephCluster cluster)
{
    private const int MiB = 1 << 20;

    [Fact]
    public void Size_kind_and_recipe_come_from_the_image()
    {
        var name = cluster.CreateImage(64 * MiB);
        using var t = cluster.Open(name);
        Assert.Equal(64L * MiB, t.Size);
        Assert.Equal(64L * MiB, t.ImageSize);
        Assert.Equal("rbd", t.Kind);
        Assert.False(t.IsReadOnly);
        Assert.True(t.HasVolatileCache);
        Assert.True(t.CanDiscard);
        Assert.Equal("rbd", t.Recipe["pool"]);
        Assert.Equal(name, t.Recipe["image"]);
        Assert.Equal(cluster.Conf, t.Recipe["conf"]);
        // The recipe rebuilds the same target (what a daemon does with it).
        t.Dispose();
        using var again = TargetFactory.Create("rbd", t.Recipe);
        Assert.Equal(64L * MiB, again.Size);
    }

    [Theory]
    [InlineData("keyring", "client.ublk.keyring")]
    [InlineData("keyfile", "client.ublk.key")]
    public void A_cephx_user_limited_to_rbd_serves_the_image_with_its_own_key(string option, string file)
    {
        // The test cluster runs with cephx on; client.ublk has 'profile rbd' on the pool only.
        var name = cluster.CreateImage(16 * MiB);
        var key = Path.Combine(cluster.Directory, file);
        var o = new Dictionary<string, string> { ["pool"] = "rbd", ["image"] = name, ["conf"] = cluster.Conf, ["id"] = "ublk", [option] = key };
        using (var t = TargetFactory.Create("rbd", o))
        {
            Assert.Equal(key, t.Recipe[option]);
            Assert.Equal("ublk", t.Recipe["id"]);
            Assert.Equal(MiB, t.Write(LoopTargetTests.Pattern(MiB, 9), 3 * MiB));
            Assert.Equal(0, t.Flush());
        }
        // Read back by another login (client.admin, the conf's keyring), so the write reached the cluster.
        using var admin = cluster.Open(name, readOnly: true);
        var back = new byte[MiB];
        Assert.Equal(MiB, admin.Read(back, 3 * MiB));
        Assert.True(back.AsSpan().SequenceEqual(LoopTargetTests.Pattern(MiB, 9)));
        // The same user with a key the cluster does not know is refused, naming the client.
        var wrong = Path.Combine(cluster.Directory, $"wrong-{option}.key");
        File.WriteAllText(wrong, option == "keyfile" ? "AQCHVhdryPJ3ExAApVIAKWA4JNI0jGXqRytYOA==\n" : "[client.ublk]\n\tkey = AQCHVhdryPJ3ExAApVIAKWA4JNI0jGXqRytYOA==\n");
        var e = Assert.Throws<IOException>(() => TargetFactory.Create("rbd", new Dictionary<string, string>(o) { [option] = wrong, ["timeout"] = "10" }));
        Assert.Contains("cephx authentication failed", e.Message, StringComparison.Ordinal);
        Assert.Contains("client.ublk", e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public async Task A_recovery_breaks_the_dead_clients_lock_and_blocklists_it_and_a_hand_over_waits_for_it()
    {
        var name = cluster.CreateImage(16 * MiB);
        Dictionary<string, string> Options(string? takeover) => new()
        {
            ["pool"] = "rbd",
            ["image"] = name,
            ["conf"] = cluster.Conf,
            ["timeout"] = "10",
            ["cache"] = "writethrough",
            [TargetFactory.TakeoverKey] = takeover ?? "",
        };
        var old = TargetFactory.Create("rbd", Options(null));
        try
        {
            Assert.True(old.SurvivesRestart, "with --rbd-cache writethrough every acknowledged write is in the cluster");
            Assert.Equal("writethrough", old.Recipe["cache"]);
            Assert.False(old.Recipe.ContainsKey(TargetFactory.TakeoverKey));
            Assert.Equal(4096, old.Write(LoopTargetTests.Pattern(4096, 1), 0));
            // A first open while it holds the lock: a second writer, refused.
            Assert.Throws<TargetLockedException>(() => TargetFactory.Create("rbd", Options(null)));
            // A recovery's open (the old client stands for a dead daemon's, which never answers):
            // the lock is broken and the old client blocklisted, so its writes fail from now on.
            using (var recovered = TargetFactory.Create("rbd", Options("break")))
            {
                Assert.Equal(4096, recovered.Write(LoopTargetTests.Pattern(4096, 2), 4096));
                Assert.True(old.Write(LoopTargetTests.Pattern(4096, 3), 0) < 0, "the blocklisted client still wrote");
                var back = new byte[4096];
                Assert.Equal(4096, recovered.Read(back, 0));
                Assert.True(back.AsSpan().SequenceEqual(LoopTargetTests.Pattern(4096, 1)), "the old client's write after the break reached the image");
            }
        }
        finally
        {
            old.Dispose();
        }
        // A hand-over: the new daemon waits for the old one to let go (here 1 s), then holds the lock.
        var first = TargetFactory.Create("rbd", Options(null));
        var releasing = false;
        var release = Task.Run(async () => { await Task.Delay(1000); Volatile.Write(ref releasing, true); first.Dispose(); }, TestContext.Current.CancellationToken);
        using (var next = TargetFactory.Create("rbd", Options("wait")))
        {
            Assert.True(Volatile.Read(ref releasing), "the wait ended before the old client let go");
            Assert.Equal(4096, next.Write(LoopTargetTests.Pattern(4096, 4), 0));
        }
        await release;
        // librbd's default cache: a crash could lose acknowledged writes, so no recovery, saying why.
        using var plain = cluster.Open(name);
        Assert.False(plain.SurvivesRestart);
        Assert.Contains("--rbd-cache writethrough", plain.RecoveryRefusal, StringComparison.Ordinal);
    }

    [Theory]
    [InlineData("luks1", "luks")]
    [InlineData("luks2", "luks2")]
    public void A_luks_encrypted_image_reads_and_writes_as_qemus_librbd_encryption_does(string format, string qemuFormat)
    {
        var name = cluster.CreateImage(32 * MiB);
        var pass = Path.Combine(cluster.Directory, $"pass-{name}");
        File.WriteAllText(pass, "correct horse battery staple");
        cluster.RbdCli("encryption", "format", $"rbd/{name}", format, pass);
        var o = new Dictionary<string, string> { ["pool"] = "rbd", ["image"] = name, ["conf"] = cluster.Conf, ["encryption-format"] = format, ["passphrase-file"] = pass };
        var plain = new byte[64 * 1024];
        Array.Fill(plain, (byte)0x77);
        long payloadSize;
        using (var t = TargetFactory.Create("rbd", o))
        {
            payloadSize = t.Size;
            Assert.True(payloadSize is > 0 and < 32 * MiB, $"the payload is {payloadSize} bytes: the LUKS header should take some of the 32 MiB");
            Assert.Equal(format, t.Recipe["encryption-format"]);
            Assert.Equal(plain.Length, t.Write(plain, MiB));
            Assert.Equal(0, t.Flush());
        }
        // What reached the cluster is ciphertext: nowhere in the raw image are the plaintext bytes.
        var raw = File.ReadAllBytes(Export(name));
        Assert.Equal(-1, raw.AsSpan().IndexOf(plain.AsSpan(0, 4096)));
        // qemu's rbd driver, with librbd's encryption, reads what we wrote and writes what we read.
        var spec = $"driver=rbd,pool=rbd,image={name},conf={cluster.Conf},encrypt.format={qemuFormat},encrypt.key-secret=sec0";
        var secret = $"secret,id=sec0,file={pass}";
        var qemu = UblkSharp.Tests.Nbd.Tools.Ok("qemu-io", "--object", secret, "--image-opts", spec, "-c", $"read -P 0x77 {MiB} 64k", "-c", $"write -P 0x5a {2 * MiB} 64k");
        Assert.DoesNotContain("fail", qemu, StringComparison.OrdinalIgnoreCase);
        using (var t = TargetFactory.Create("rbd", o))
        {
            var back = new byte[64 * 1024];
            Assert.Equal(back.Length, t.Read(back, 2 * MiB));
            Assert.All(back, b => Assert.Equal(0x5a, b));
            Assert.Equal(payloadSize, t.Size);
        }
        // A wrong passphrase is refused at open, saying what to check.
        File.WriteAllText(pass + ".wrong", "incorrect horse");
        var e = Assert.Throws<IOException>(() => TargetFactory.Create("rbd", new Dictionary<string, string>(o) { ["passphrase-file"] = pass + ".wrong" }));
        Assert.Contains("a wrong passphrase", e.Message, StringComparison.Ordinal);
    }

    private string Export(string name)
    {
        var file = Path.Combine(cluster.Directory, $"{name}.raw");
        File.Delete(file);
        cluster.RbdCli("export", $"rbd/{name}", file);
        return file;
    }

    [Fact]
    public void Write_patterns_read_back_across_object_boundaries()
    {
        var name = cluster.CreateImage(64 * MiB);
        using (var t = cluster.Open(name))
        {
            // 4 MiB objects: these straddle boundaries, hit the first and last sectors, and overlap.
            (long Offset, int Length, int Seed)[] writes =
            [
                (0, 4096, 1), (4 * MiB - 2048, 8192, 2), (64L * MiB - 512, 512, 3), (10 * MiB + 512, 3 * MiB, 4), (11 * MiB, 4096, 5),
            ];
            foreach (var (offset, length, seed) in writes)
            {
                Assert.Equal(length, t.Write(LoopTargetTests.Pattern(length, seed), offset));
            }
            Assert.Equal(0, t.Flush());
            var expected = new byte[64 * MiB];
            foreach (var (offset, length, seed) in writes)
            {
                LoopTargetTests.Pattern(length, seed).CopyTo(expected, offset);
            }
            AssertImage(t, expected);
        }
        // And through another client: the data is in the cluster, not in our cache.
        var exported = Path.Combine(cluster.Directory, $"{name}.raw");
        cluster.RbdCli("export", $"rbd/{name}", exported);
        var onCluster = File.ReadAllBytes(exported);
        File.Delete(exported);
        using var check = cluster.Open(name, readOnly: true);
        var back = new byte[onCluster.Length];
        Assert.Equal(back.Length, check.Read(back, 0));
        Assert.True(back.AsSpan().SequenceEqual(onCluster));
    }

    [Fact]
    public void Discard_and_write_zeroes_read_back_as_zeros()
    {
        var name = cluster.CreateImage(32 * MiB);
        using var t = cluster.Open(name);
        var data = LoopTargetTests.Pattern(16 * MiB, 7);
        Assert.Equal(data.Length, t.Write(data, 0));
        Assert.Equal(0, t.Discard(4 * MiB, 4 * MiB));         // a whole object
        // Inside one object: librbd skips a partial discard (rbd_skip_partial_discard), which
        // discard allows, so only its success is checked.
        Assert.Equal(0, t.Discard(MiB + 512, 4096));
        Assert.Equal(0, t.WriteZeroes(9 * MiB, 3 * MiB, mayUnmap: true));
        Assert.Equal(0, t.WriteZeroes(13 * MiB + 4096, 8192, mayUnmap: false));
        Assert.Equal(0, t.Flush());
        var expected = new byte[32 * MiB];
        data.CopyTo(expected, 0);
        Array.Clear(expected, 4 * MiB, 4 * MiB);
        Array.Clear(expected, 9 * MiB, 3 * MiB);
        Array.Clear(expected, 13 * MiB + 4096, 8192);
        AssertImage(t, expected, ignore: (MiB + 512, 4096));
    }

    [Fact]
    public void Out_of_range_IO_fails_and_changes_nothing()
    {
        var name = cluster.CreateImage(8 * MiB);
        using var t = cluster.Open(name);
        var buffer = new byte[8192];
        Assert.True(t.Write(LoopTargetTests.Pattern(4096, 9), 8 * MiB) < 0);
        Assert.True(t.Read(buffer, 9 * MiB) < 0);
        Assert.True(t.Discard(16 * MiB, 4096) < 0);
        Assert.Equal(8L * MiB, t.Size);
        // A request that starts inside and runs past the end: librbd clips it, never writes past it.
        var n = t.Write(LoopTargetTests.Pattern(8192, 10), 8 * MiB - 4096);
        Assert.True(n is 4096 or < 0, $"a write across the end returned {n}");
        Assert.Equal(8L * MiB, long.Parse(cluster.RbdCli("info", "--format", "json", $"rbd/{name}").Split("\"size\":")[1].Split(',')[0], System.Globalization.CultureInfo.InvariantCulture));
    }

    [Fact]
    public void Read_only_and_snapshot_opens_refuse_writes_and_read_the_data()
    {
        var name = cluster.CreateImage(8 * MiB);
        var before = LoopTargetTests.Pattern(MiB, 11);
        using (var t = cluster.Open(name))
        {
            Assert.Equal(MiB, t.Write(before, 0));
            Assert.Equal(0, t.Flush());
        }
        cluster.RbdCli("snap", "create", $"rbd/{name}@s1");
        using (var t = cluster.Open(name))
        {
            Assert.Equal(MiB, t.Write(LoopTargetTests.Pattern(MiB, 12), 0));
        }
        using var snap = cluster.Open(name, snapshot: "s1");
        Assert.True(snap.IsReadOnly);
        Assert.Equal(-Errno.EROFS, snap.Write(before, 0));
        var back = new byte[MiB];
        Assert.Equal(MiB, snap.Read(back, 0));
        Assert.True(back.AsSpan().SequenceEqual(before), "the snapshot reads what was written before it");
        using var ro = cluster.Open(name, readOnly: true);
        Assert.True(ro.IsReadOnly);
        Assert.Equal(-Errno.EROFS, ro.Write(before, 0));
        Assert.Equal(MiB, ro.Read(back, 0));
        Assert.True(back.AsSpan().SequenceEqual(LoopTargetTests.Pattern(MiB, 12)), "the head reads the later write");

        // The same snapshot by its id (rbd-nbd's --snap-id), which the recipe keeps.
        using var list = System.Text.Json.JsonDocument.Parse(cluster.RbdCli("snap", "ls", "--format", "json", $"rbd/{name}"));
        var id = list.RootElement.EnumerateArray().Single(e => e.GetProperty("name").GetString() == "s1").GetProperty("id").GetUInt64();
        var byId = new Dictionary<string, string> { ["pool"] = "rbd", ["image"] = name, ["conf"] = cluster.Conf, ["snap-id"] = $"{id}" };
        using (var s = TargetFactory.Create("rbd", byId))
        {
            Assert.True(s.IsReadOnly);
            Assert.Equal($"{id}", s.Recipe["snap-id"]);
            Assert.Equal(MiB, s.Read(back, 0));
            Assert.True(back.AsSpan().SequenceEqual(before), "the snapshot by id reads what was written before it");
        }
        var e = Assert.Throws<IOException>(() => TargetFactory.Create("rbd", new Dictionary<string, string>(byId) { ["snap-id"] = $"{id + 1000}" }));
        Assert.Contains($"has no snapshot with id {id + 1000}", e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void A_resize_is_noticed_and_reported_and_the_device_keeps_its_size()
    {
        var name = cluster.CreateImage(16 * MiB);
        var log = new CapturingLoggerFactory();
        using var resized = new ManualResetEventSlim();
        using var t = cluster.Open(name, loggerFactory: log);
        t.Resized += (_, _) => resized.Set();
        cluster.RbdCli("resize", "--size", "32M", $"rbd/{name}");
        Assert.True(resized.Wait(TimeSpan.FromSeconds(60), TestContext.Current.CancellationToken), "no resize notification within 60 s");
        Assert.Equal(32L * MiB, t.ImageSize);
        Assert.Equal(16L * MiB, t.Size);
        var report = Assert.Single(log.Messages);
        Assert.Contains("resized from 16777216 to 33554432 bytes", report, StringComparison.Ordinal);
        Assert.Contains("6.16", report, StringComparison.Ordinal);
        // IO inside the old size still works after the resize.
        Assert.Equal(4096, t.Write(LoopTargetTests.Pattern(4096, 13), 16 * MiB - 4096));
    }

    private static void AssertImage(RbdTarget t, byte[] expected, (int Offset, int Length) ignore = default)
    {
        var back = new byte[expected.Length];
        var done = 0;
        while (done < back.Length)
        {
            var n = t.Read(back.AsSpan(done), done);
            Assert.True(n > 0, $"read at {done} returned {n}");
            done += n;
        }
        for (var i = 0; i < expected.Length; i += 512)
        {
            if (i >= ignore.Offset && i < ignore.Offset + ignore.Length)
            {
                continue;
            }
            if (!back.AsSpan(i, 512).SequenceEqual(expected.AsSpan(i, 512)))
            {
                Assert.Fail($"sector at byte {i} differs");
            }
        }
    }
}
