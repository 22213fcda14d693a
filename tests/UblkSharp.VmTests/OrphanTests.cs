using System.Diagnostics;
using System.Text.Json;
using UblkSharp.Interop;
using UblkSharp.Runtime;
using UblkSharp.Ublk;

namespace UblkSharp.VmTests;

/// <summary>
/// No orphans: a device whose daemon is gone for good is listed as an orphan with the reason and
/// `del` removes it; two takeovers of one device cannot both proceed; and a daemon killed under a
/// file system mounted (in its own mount namespace) on its device can be recovered, since it holds
/// nothing on that file system.
/// </summary>
public class OrphanTests
{
    private const string ImageA = "/tmp/ublksharp-orphan-a.img";
    private const string ImageB = "/tmp/ublksharp-orphan-b.img";
    private const string ImageC = "/tmp/ublksharp-orphan-c.img";
    private const string Mnt = "/tmp/ublksharp-orphan-mnt";

    private static string? Orphan(JsonElement row) => row.GetProperty("orphan").ValueKind == JsonValueKind.Null ? null : row.GetProperty("orphan").GetString();

    [Fact]
    [Trait("kernel", "7.3")]
    public void OrphansAreListedWithTheirReasonAndDelRemovesThem()
    {
        VmEnvironment.RequireDriver();
        foreach (var image in new[] { ImageA, ImageB, ImageC })
        {
            Lifecycle.CreateImage(image, 64 << 20);
        }
        try
        {
            var noRecovery = CliDevices.IdOf(CliDevices.Add($"-t loop -f {ImageA}"));
            var recipeLost = CliDevices.IdOf(CliDevices.Add($"-t loop -f {ImageB} --recovery on"));
            var recoverable = CliDevices.IdOf(CliDevices.Add($"-t loop -f {ImageC} --recovery on"));
            var live = CliDevices.List();
            foreach (var id in new[] { noRecovery, recipeLost, recoverable })
            {
                Assert.Null(Orphan(live[id]));
                // The daemon records its build: the same assembly this runner was built with.
                Assert.Equal(DeviceRecord.CurrentVersion, live[id].GetProperty("version").GetString());
            }

            var pids = new[] { noRecovery, recipeLost, recoverable }.Select(Lifecycle.DaemonPid).ToArray();
            foreach (var pid in pids)
            {
                Lifecycle.Kill9(pid);
            }
            Lifecycle.WaitForState(noRecovery, DeviceState.Dead, TimeSpan.FromSeconds(30));
            Lifecycle.WaitForState(recipeLost, DeviceState.Quiesced, TimeSpan.FromSeconds(30));
            Lifecycle.WaitForState(recoverable, DeviceState.Quiesced, TimeSpan.FromSeconds(30));
            File.Delete(DeviceRecord.PathFor(recipeLost));

            var rows = CliDevices.List();
            VmEnvironment.Log(string.Join('\n', rows.Select(kv => $"{kv.Key}: {kv.Value}")));
            Assert.Equal("its daemon is gone and it was created without recovery", Orphan(rows[noRecovery]));
            Assert.Equal($"its daemon is gone and its recipe {DeviceRecord.PathFor(recipeLost)} is lost", Orphan(rows[recipeLost]));
            Assert.Null(Orphan(rows[recoverable])); // `recover` can still bring it back
            Assert.Equal("quiesced", rows[recipeLost].GetProperty("state").GetString()); // the kernel's state stays as it is
            Assert.Equal(JsonValueKind.Null, rows[recipeLost].GetProperty("version").ValueKind); // no recipe, no version

            var (code, table) = VmEnvironment.RunCli("list");
            VmEnvironment.Log(table);
            Assert.Equal(0, code);
            Assert.Contains($"device {noRecovery} is an orphan (kernel state DEAD): its daemon is gone and it was created without recovery; 'ublksharp del -n {noRecovery}' removes it", table, StringComparison.Ordinal);
            Assert.Contains($"device {recipeLost} is an orphan (kernel state QUIESCED)", table, StringComparison.Ordinal);
            Assert.DoesNotContain($"device {recoverable} is an orphan", table, StringComparison.Ordinal);
            Assert.Equal(2, table.Split('\n').Count(l => l.Split(' ', StringSplitOptions.RemoveEmptyEntries) is [_, "ORPHAN", ..]));

            Lifecycle.AssertRefused($"recover -n {recipeLost}", "no record of device");
            var sw = Stopwatch.StartNew();
            CliDevices.Del(noRecovery);
            var delOne = sw.Elapsed;
            sw.Restart();
            var (delAll, output) = VmEnvironment.RunCli("del --all", TimeSpan.FromMinutes(2));
            Assert.True(delAll == 0, $"del --all exited {delAll}:\n{output}");
            VmEnvironment.Figure($"orphans: del -n of the one without recovery took {Lifecycle.Seconds(delOne)}, del --all of the rest {Lifecycle.Seconds(sw.Elapsed)}");
            Assert.Empty(VmEnvironment.DeviceIds());
            Assert.False(File.Exists(DeviceRecord.PathFor(recoverable)), "the record outlived del --all");
            Assert.Empty(VmEnvironment.CliProcesses());
        }
        finally
        {
            Lifecycle.CleanUp();
            File.Delete(ImageA);
            File.Delete(ImageB);
            File.Delete(ImageC);
        }
    }

    [Fact]
    public async Task OneTakeoverAtATimeAndTheOtherIsRefusedCleanly()
    {
        VmEnvironment.RequireDriver();
        Lifecycle.CreateImage(ImageA, 64 << 20);
        try
        {
            var dev = CliDevices.Add($"-t loop -f {ImageA} --recovery on");
            var id = CliDevices.IdOf(dev);
            var pattern = new byte[64 << 10];
            new Random(14).NextBytes(pattern);
            DirectIo.Write(dev, 1 << 20, pattern);
            var pid = Lifecycle.DaemonPid(id);
            Lifecycle.Kill9(pid);
            Lifecycle.WaitForState(id, DeviceState.Quiesced, TimeSpan.FromSeconds(30));

            // A takeover under way (this process holds the lock): `recover` says so, and so does its
            // daemon when started directly (the lock the library takes, not only the CLI's check).
            using (TakeoverLock.Take(id, "test"))
            {
                Lifecycle.AssertRefused($"recover -n {id}", $"another recovery (or upgrade) of device {id} is in progress", $"pid {Environment.ProcessId}, test");
                Lifecycle.AssertRefused($"recover -n {id} --foreground", "is in progress");
                Assert.Equal(DeviceState.Quiesced, Lifecycle.State(id)); // untouched: no half takeover
                // No new daemon: the kernel still names the dead one (6.12) or none (7.x says -1).
                var kernelPid = Lifecycle.Info(id)!.Value.ublksrv_pid;
                Assert.True(kernelPid == pid || kernelPid <= 0, $"device {id} has a daemon (pid {kernelPid}) after a refused recover");
                Assert.Empty(VmEnvironment.CliProcesses());
            }

            // Two at once: exactly one wins; the other fails with a clear line.
            var both = await Task.WhenAll(
                Task.Run(() => VmEnvironment.RunCli($"recover -n {id}", TimeSpan.FromMinutes(2)), TestContext.Current.CancellationToken),
                Task.Run(() => VmEnvironment.RunCli($"recover -n {id}", TimeSpan.FromMinutes(2)), TestContext.Current.CancellationToken));
            foreach (var (code, output) in both)
            {
                VmEnvironment.Log($"recover: exit {code}: {output.Trim()}");
            }
            Assert.True(both.Count(r => r.ExitCode == 0) == 1, $"not exactly one recover won:\n{string.Join("\n", both.Select(r => $"exit {r.ExitCode}: {r.Output}"))}\n{CliDevices.DaemonLogs()}");
            var loser = both.Single(r => r.ExitCode != 0).Output;
            Assert.True(loser.Contains("is in progress", StringComparison.Ordinal) || loser.Contains("is live", StringComparison.Ordinal),
                $"the losing recover did not say another recovery won:\n{loser}");
            Assert.DoesNotContain("   at ", loser, StringComparison.Ordinal);
            VmEnvironment.Figure($"two recovers at once: the loser said: {loser.Trim()}");

            var newPid = Lifecycle.WaitForNewDaemon(id, pid, TimeSpan.FromSeconds(30));
            // One daemon, no leftover (a losing daemon may take a moment to exit after its report).
            Assert.True(VmEnvironment.WaitFor(() => VmEnvironment.CliProcesses().Length == 1, TimeSpan.FromSeconds(20)),
                $"CLI processes left: {string.Join(' ', VmEnvironment.CliProcesses())} (the daemon is {newPid})");
            Assert.Equal(pattern, DirectIo.Read(dev, 1 << 20, pattern.Length));
            DirectIo.Write(dev, 2 << 20, pattern);
            Assert.Equal(pattern, DirectIo.Read(dev, 2 << 20, pattern.Length));
            Assert.False(TakeoverLock.IsHeld(id), "the winner kept the takeover lock after END_USER_RECOVERY");
            CliDevices.Del(id);
            Assert.False(Processes.IsAlive(newPid), $"the recovered daemon (pid {newPid}) outlived del");
        }
        finally
        {
            Lifecycle.CleanUp();
            File.Delete(ImageA);
        }
    }

    [Fact]
    public void ADaemonKilledUnderAMountOnItsDeviceIsRecovered()
    {
        VmEnvironment.RequireDriver();
        Lifecycle.CreateImage(ImageA, 64 << 20);
        VmEnvironment.ShOk($"mkfs.ext4 -q -F -E nodiscard {ImageA}");
        try
        {
            var dev = CliDevices.Add($"-t loop -f {ImageA} --recovery on");
            var id = CliDevices.IdOf(dev);
            Lifecycle.Mount(dev, Mnt);
            var data = new byte[256 << 10];
            new Random(15).NextBytes(data);
            File.WriteAllBytes(Path.Combine(Mnt, "before"), data);
            VmEnvironment.ShOk("sync");
            var pid = Lifecycle.DaemonPid(id);
            AssertHoldsNothingUnder(pid, Mnt);
            Lifecycle.Kill9(pid);
            Lifecycle.WaitForState(id, DeviceState.Quiesced, TimeSpan.FromSeconds(30));

            // `recover` run from inside the mount: the new daemon must not keep that as its directory.
            var output = VmEnvironment.ShOk($"cd {Mnt} && {VmEnvironment.Cli} recover -n {id}", TimeSpan.FromMinutes(2));
            Assert.Contains(dev, output, StringComparison.Ordinal);
            var newPid = Lifecycle.WaitForNewDaemon(id, pid, TimeSpan.FromSeconds(30));
            AssertHoldsNothingUnder(newPid, Mnt);
            Assert.Equal(data, File.ReadAllBytes(Path.Combine(Mnt, "before")));
            File.WriteAllBytes(Path.Combine(Mnt, "after"), data);
            VmEnvironment.ShOk("sync");

            // Once more, now that the daemon is one that recover started.
            Lifecycle.Kill9(newPid);
            Lifecycle.WaitForState(id, DeviceState.Quiesced, TimeSpan.FromSeconds(30));
            Lifecycle.Recover(id);
            Lifecycle.WaitForNewDaemon(id, newPid, TimeSpan.FromSeconds(30));
            Assert.Equal(data, File.ReadAllBytes(Path.Combine(Mnt, "after")));

            Lifecycle.Umount(Mnt);
            var fsck = VmEnvironment.ShOk($"e2fsck -fn {dev}");
            VmEnvironment.Log(fsck);
            CliDevices.Del(id);
        }
        finally
        {
            Lifecycle.CleanUp(Mnt);
            File.Delete(ImageA);
        }
    }

    // The daemon shares this mount namespace (so the mount is in its namespace too), and neither
    // its directory nor any descriptor it holds lies on the file system on its own device.
    private static void AssertHoldsNothingUnder(int pid, string mnt)
    {
        Assert.Equal(new FileInfo("/proc/self/ns/mnt").LinkTarget, new FileInfo($"/proc/{pid}/ns/mnt").LinkTarget);
        Assert.Equal("/", new FileInfo($"/proc/{pid}/cwd").LinkTarget);
        var held = Directory.GetFileSystemEntries($"/proc/{pid}/fd").Select(fd => new FileInfo(fd).LinkTarget ?? "")
            .Where(t => t.StartsWith(mnt + "/", StringComparison.Ordinal) || t == mnt).ToArray();
        Assert.True(held.Length == 0, $"daemon {pid} holds files on its own device's file system: {string.Join(", ", held)}");
    }
}
