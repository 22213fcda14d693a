using System.Diagnostics;
using System.Security.Cryptography;

namespace UblkSharp.VmTests;

/// <summary>
/// A single-node Ceph cluster inside the guest, on the guest's own loopback (tests/ceph/cluster.sh;
/// the packages come through the shared root), started once for the class.
/// </summary>
public sealed class GuestCephCluster : IDisposable
{
    public GuestCephCluster()
    {
        Directory = "/tmp/ublksharp-ceph";
        var (code, stdout, stderr) = VmEnvironment.Exec(Script, ["start", Directory], TimeSpan.FromMinutes(6));
        if (code != 0)
        {
            VmEnvironment.Exec(Script, ["stop", Directory], TimeSpan.FromMinutes(1));
            throw new InvalidOperationException($"the guest's Ceph cluster did not start (exit {code}):\n{stdout}\n{stderr}");
        }
        Console.WriteLine($"FIGURE ceph in the guest: {stdout.Trim()}");
    }

    public string Directory { get; }

    public string Conf => Path.Combine(Directory, "ceph.conf");

    public static string Script => Path.Combine(VmEnvironment.RepoRoot, "tests", "ceph", "cluster.sh");

    public string Rbd(string args)
    {
        var (code, output) = VmEnvironment.Run("rbd", $"-c {Conf} {args}", TimeSpan.FromMinutes(2));
        Assert.True(code == 0, $"rbd {args} exited {code}:\n{output}");
        return output;
    }

    public void Script_(string command)
    {
        var (code, stdout, stderr) = VmEnvironment.Exec(Script, [command, Directory], TimeSpan.FromMinutes(4));
        Assert.True(code == 0, $"cluster.sh {command} exited {code}:\n{stdout}{stderr}");
    }

    public void Dispose() => VmEnvironment.Exec(Script, ["stop", Directory], TimeSpan.FromMinutes(1));
}

/// <summary>
/// The rbd target as /dev/ublkbN on the real driver: ext4 on an RBD image with a clean e2fsck,
/// clear `add` errors that leave no device behind, a resize reported on 6.12, the OSD killed
/// under IO: EIO within the timeout, no hang, and IO again once the OSD is back; and fio verify
/// through 4 queues on one image (4 CPUs, so that each queue gets IO).
/// </summary>
[Trait("cpus", "4")]
public class RbdVmTests(GuestCephCluster cluster) : IClassFixture<GuestCephCluster>
{
    private const string Mnt = "/tmp/ublksharp-rbd-mnt";

    [Fact]
    public void An_rbd_device_keeps_an_ext4_file_system_and_a_resize_is_reported()
    {
        VmEnvironment.RequireDriver();
        cluster.Rbd("create --size 256M rbd/fs");
        Directory.CreateDirectory(Mnt);
        try
        {
            var since = DateTime.Now;
            var dev = CliDevices.Add($"-t rbd --pool rbd --image fs --conf {cluster.Conf}");
            Assert.Equal("268435456", VmEnvironment.ShOk($"blockdev --getsize64 {dev}").Trim());
            Assert.Contains("rbd", CliDevices.List()[CliDevices.IdOf(dev)].ToString(), StringComparison.Ordinal);
            VmEnvironment.ShOk($"mkfs.ext4 -q -F {dev}", TimeSpan.FromMinutes(4));
            VmEnvironment.ShOk($"mount {dev} {Mnt}");
            var sums = new Dictionary<string, string>(StringComparer.Ordinal);
            var random = new Random(8);
            foreach (var (name, size) in new[] { ("a.bin", 1 << 20), ("dir/b.bin", 3 << 20), ("dir/deep/c.bin", 777_777), ("one-byte", 1) })
            {
                var data = new byte[size];
                random.NextBytes(data);
                Directory.CreateDirectory(Path.GetDirectoryName(Path.Combine(Mnt, name))!);
                File.WriteAllBytes(Path.Combine(Mnt, name), data);
                sums[name] = Convert.ToHexString(SHA256.HashData(data));
            }
            VmEnvironment.ShOk($"umount {Mnt}", TimeSpan.FromMinutes(3));
            var (code, output) = VmEnvironment.Sh($"e2fsck -fn {dev}", TimeSpan.FromMinutes(3));
            Assert.True(code == 0, $"e2fsck -fn {dev} exited {code}:\n{output}");
            // Dropped caches, so the files come back from the cluster.
            VmEnvironment.ShOk($"echo 3 > /proc/sys/vm/drop_caches && mount -o ro {dev} {Mnt}");
            foreach (var (name, sum) in sums)
            {
                Assert.Equal(sum, Convert.ToHexString(SHA256.HashData(File.ReadAllBytes(Path.Combine(Mnt, name)))));
            }
            VmEnvironment.ShOk($"umount {Mnt}");

            // A resize of the image is noticed and reported; on 6.12 the device keeps its size.
            cluster.Rbd("resize --size 384M rbd/fs");
            Assert.True(VmEnvironment.WaitFor(() => CliDevices.DaemonLogs(since).Contains("resized from 268435456 to 402653184", StringComparison.Ordinal), TimeSpan.FromSeconds(60)),
                $"no resize report in the daemon log:\n{CliDevices.DaemonLogs(since)}");
            if (VmEnvironment.Is612)
            {
                Assert.Contains("needs UPDATE_SIZE (Linux 6.16 or later), and this kernel is 6.12", CliDevices.DaemonLogs(since), StringComparison.Ordinal);
                Assert.Equal("268435456", VmEnvironment.ShOk($"blockdev --getsize64 {dev}").Trim());
            }
            CliDevices.Del(CliDevices.IdOf(dev));
        }
        finally
        {
            CliDevices.CleanUp(Mnt);
        }
    }

    [Fact]
    public void Fio_verify_passes_through_four_queues_on_one_image()
    {
        VmEnvironment.RequireDriver();
        const int jobs = 4;
        Assert.True(Environment.ProcessorCount >= jobs, $"the guest has {Environment.ProcessorCount} CPUs: this test needs {jobs} (tools/ublksharp-vm -c {jobs})");
        cluster.Rbd("create --size 128M rbd/queues");
        var options = new Dictionary<string, string> { ["pool"] = "rbd", ["image"] = "queues", ["conf"] = cluster.Conf };
        using var target = UblkSharp.Targets.TargetFactory.Create("rbd", options);
        Exception? fatal = null;
        using var device = UblkSharp.Runtime.UblkDevice.Create(target, new UblkSharp.Runtime.DeviceOptions { Queues = jobs, Depth = 64, MaxIoBytes = 1 << 20 }, e => fatal = e);
        // fio pins a job on each CPU, and the block layer maps each CPU to its own queue.
        var r = Fio.Run(device.BlockPath, TimeSpan.FromMinutes(6), "--rw=randwrite", "--bsrange=512-1m", "--verify=crc32c",
            "--do_verify=1", "--verify_state_save=0", $"--numjobs={jobs}", "--size=16M", "--offset_increment=16M");
        Fio.AssertVerified(r);
        Assert.Null(fatal);
        Assert.Equal(0, device.Errors);
        Assert.Equal(0, device.ExactlyOnceViolations);
        var perQueue = string.Join(", ", device.Queues.Select(q => q.Completed));
        VmEnvironment.Figure($"rbd through {jobs} queues in the guest: requests per queue {perQueue}; {r.Summary}");
        Assert.All(device.Queues, q => Assert.True(q.Completed > 0, $"queue {q.QueueId} served nothing: {perQueue}"));
    }

    [Fact]
    public async Task Reissue_recovery_after_kill_9_loses_nothing_and_blocklists_the_dead_client()
    {
        VmEnvironment.RequireDriver();
        cluster.Rbd("create --size 128M rbd/recover");
        try
        {
            // librbd's default cache acknowledges writes the cluster may not have: no crash recovery.
            Lifecycle.AssertRefused($"add -t rbd --pool rbd --image recover --conf {cluster.Conf} --recovery reissue --supervise", "--rbd-cache writethrough");
            var since = DateTime.Now;
            var dev = CliDevices.Add($"-t rbd --pool rbd --image recover --conf {cluster.Conf} --rbd-cache writethrough -q 2 --recovery reissue");
            var id = CliDevices.IdOf(dev);
            var pid = Lifecycle.DaemonPid(id);
            var fio = Task.Run(() => Fio.Run(dev, TimeSpan.FromMinutes(6), "--rw=randwrite", "--bsrange=4k-128k", "--verify=crc32c", "--do_verify=1",
                "--verify_state_save=0", "--size=24M", "--offset_increment=24M", "--randseed=21"), TestContext.Current.CancellationToken);
            var writes = Lifecycle.WaitForWrites(dev, 100, fio, TimeSpan.FromMinutes(3));
            Lifecycle.Kill9(pid);
            // The dead daemon's client still holds the image's lock: the new daemon breaks it.
            var recover = Lifecycle.Recover(id);
            var newPid = Lifecycle.WaitForNewDaemon(id, pid, TimeSpan.FromSeconds(30));
            var r = await fio;
            VmEnvironment.Figure($"rbd recovery in the guest: killed daemon {pid} after {writes} writes; recover took {Lifecycle.Seconds(recover)}; new daemon {newPid}; fio: {r.Summary}");
            Fio.AssertVerified(r);
            Assert.Contains("took over the exclusive lock", CliDevices.DaemonLogs(since), StringComparison.Ordinal);
            var (code, blocklist) = VmEnvironment.Run("ceph", $"-c {cluster.Conf} osd blocklist ls", TimeSpan.FromMinutes(2));
            Assert.True(code == 0 && blocklist.Contains("listed ", StringComparison.Ordinal) && !blocklist.Contains("listed 0 ", StringComparison.Ordinal),
                $"the dead daemon's client is not blocklisted:\n{blocklist}");
            CliDevices.Del(id);
        }
        finally
        {
            CliDevices.CleanUp();
        }
    }

    [Fact]
    public async Task Upgrades_under_fio_verify_hand_the_image_and_its_lock_over()
    {
        VmEnvironment.RequireDriver();
        cluster.Rbd("create --size 64M rbd/upgrade");
        try
        {
            // librbd's default cache: a hand-over flushes, so an upgrade needs no write-through.
            var dev = CliDevices.Add($"-t rbd --pool rbd --image upgrade --conf {cluster.Conf} --recovery reissue");
            var id = CliDevices.IdOf(dev);
            var upgrading = true;
            var fio = Task.Run(() =>
            {
                var runs = new List<FioResult>();
                do
                {
                    runs.Add(Fio.Run(dev, TimeSpan.FromMinutes(5), "--rw=randwrite", "--bsrange=4k-128k", "--verify=crc32c", "--do_verify=1",
                        "--verify_state_save=0", "--size=8M", "--offset_increment=8M", "--rate_iops=50", $"--randseed={runs.Count + 1}"));
                }
                while (Volatile.Read(ref upgrading) && runs[^1].ExitCode == 0);
                return runs;
            }, TestContext.Current.CancellationToken);
            var seconds = new List<string>();
            for (var u = 0; u < 3; u++)
            {
                var pid = CliDevices.DaemonPid(id);
                var sw = Stopwatch.StartNew();
                var (code, output) = VmEnvironment.RunCli($"upgrade -n {id}", TimeSpan.FromMinutes(4));
                Assert.True(code == 0, $"upgrade {u} exited {code}:\n{output}\n{CliDevices.DaemonLogs()}");
                seconds.Add(Lifecycle.Seconds(sw.Elapsed));
                Assert.NotEqual(pid, CliDevices.DaemonPid(id));
            }
            Volatile.Write(ref upgrading, false);
            var runs = await fio;
            VmEnvironment.Figure($"rbd upgrades in the guest: 3 under fio verify, each {string.Join(", ", seconds)}; {runs.Count} verify runs: {runs[^1].Summary}");
            Assert.All(runs, Fio.AssertVerified);
            CliDevices.Del(id);
        }
        finally
        {
            CliDevices.CleanUp();
        }
    }

    [Fact]
    public void Add_errors_are_clear_and_leave_no_device()
    {
        VmEnvironment.RequireDriver();
        cluster.Rbd("create --size 64M rbd/locked");
        try
        {
            AssertAddFails($"-t rbd --pool rbd --image nosuch --conf {cluster.Conf}", "pool 'rbd' has no image 'nosuch'");
            File.WriteAllText("/tmp/unreachable.conf", System.Text.RegularExpressions.Regex.Replace(File.ReadAllText(cluster.Conf), "mon_host = .*", "mon_host = v2:127.0.0.1:9"));
            AssertAddFails("-t rbd --pool rbd --image x --conf /tmp/unreachable.conf --timeout 3", "no monitor answered within 3 s");

            // A second writer: the first device holds the image's exclusive lock.
            var dev = CliDevices.Add($"-t rbd --pool rbd --image locked --conf {cluster.Conf}");
            AssertAddFails($"-t rbd --pool rbd --image locked --conf {cluster.Conf}", "is in use: another client holds its exclusive lock", devicesLeft: 1);
            CliDevices.Del(CliDevices.IdOf(dev));
        }
        finally
        {
            CliDevices.CleanUp();
        }
    }

    [Fact]
    public void Killing_the_OSD_fails_device_IO_with_EIO_within_the_timeout_and_IO_resumes()
    {
        VmEnvironment.RequireDriver();
        cluster.Rbd("create --size 64M rbd/fault");
        var osdDown = false;
        try
        {
            var dev = CliDevices.Add($"-t rbd --pool rbd --image fault --conf {cluster.Conf} --timeout 10");
            VmEnvironment.ShOk($"dd if=/dev/urandom of={dev} bs=1M count=8 oflag=direct status=none");
            cluster.Script_("kill-osd");
            osdDown = true;
            // Direct IO, so the page cache answers nothing; bounded, so a hang fails the test rather than the run.
            var sw = Stopwatch.StartNew();
            var (code, output) = VmEnvironment.Sh($"dd if={dev} of=/dev/null bs=64k count=4 skip=40 iflag=direct status=none", TimeSpan.FromMinutes(2));
            Assert.True(code != 0 && output.Contains("Input/output error", StringComparison.Ordinal), $"a read with the OSD down: exit {code}: {output}");
            (code, output) = VmEnvironment.Sh($"dd if=/dev/zero of={dev} bs=64k count=4 seek=90 oflag=direct,dsync status=none", TimeSpan.FromMinutes(2));
            Assert.True(code != 0 && output.Contains("Input/output error", StringComparison.Ordinal), $"a write with the OSD down: exit {code}: {output}");
            VmEnvironment.Figure($"rbd fault in the guest: a read and a write to a dead OSD failed with EIO after {sw.Elapsed.TotalSeconds:F1} s (timeout 10 s each)");

            cluster.Script_("start-osd");
            osdDown = false;
            sw.Restart();
            Assert.True(VmEnvironment.WaitFor(() => VmEnvironment.Sh($"dd if={dev} of=/dev/null bs=64k count=4 skip=60 iflag=direct status=none", TimeSpan.FromMinutes(1)).ExitCode == 0, TimeSpan.FromMinutes(2)),
                "reads did not succeed again within 2 minutes of the OSD restart");
            VmEnvironment.ShOk($"dd if=/dev/zero of={dev} bs=64k count=4 seek=90 oflag=direct,dsync status=none", TimeSpan.FromMinutes(1));
            VmEnvironment.Figure($"rbd fault in the guest: IO succeeded again {sw.Elapsed.TotalSeconds:F1} s after the OSD restarted");
            CliDevices.Del(CliDevices.IdOf(dev));
        }
        finally
        {
            if (osdDown)
            {
                cluster.Script_("start-osd");
            }
            CliDevices.CleanUp();
        }
    }

    private static void AssertAddFails(string args, string message, int devicesLeft = 0)
    {
        var (code, output) = VmEnvironment.RunCli("add " + args);
        Assert.True(code != 0, $"add {args} succeeded:\n{output}");
        Assert.Contains(message, output, StringComparison.Ordinal);
        Assert.DoesNotContain("   at ", output, StringComparison.Ordinal);
        Assert.Equal(devicesLeft, VmEnvironment.DeviceIds().Length);
    }
}
