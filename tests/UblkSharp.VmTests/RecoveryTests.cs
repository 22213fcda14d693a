using System.Diagnostics;
using UblkSharp.Interop;
using UblkSharp.Runtime;
using UblkSharp.Ublk;

namespace UblkSharp.VmTests;

/// <summary>
/// A CLI daemon killed with kill -9 in the middle of a fio run, per recovery mode: reissue loses
/// nothing (crc32c verify), on fails only the requests the dead daemon held and holds the rest for
/// the new daemon, off takes the device down with errors and no hang; and 20 kill/recover cycles
/// under a verifying load.
/// </summary>
public class RecoveryTests
{
    private const string Image = "/tmp/ublksharp-recovery.img";

    private static readonly TimeSpan FioTimeout = TimeSpan.FromMinutes(4);

    /// <summary>A crc32c write-then-verify job as <see cref="Fio.Verify"/>, with its own seed, so that each run writes new data.</summary>
    private static FioResult Verify(string device, string sizePerJob, int seed) => Fio.Run(device, FioTimeout,
        "--rw=randwrite", "--bsrange=4k-128k", "--verify=crc32c", "--do_verify=1", "--verify_state_save=0",
        $"--size={sizePerJob}", $"--offset_increment={sizePerJob}", $"--randseed={seed}");

    [Theory]
    [InlineData("")]
    // The loop file on the ring, so zero copy where the kernel has it (7.3): the recovered daemon's
    // queues register their buffer tables again, and the requests reissued find them.
    [InlineData("--io ring --zero-copy auto")]
    // The same with batched IO where the kernel has it (7.0+): the dead daemon's multishot fetches
    // and the requests it held go back to the driver, and the new one's PREP_IO_CMDS finds them.
    [InlineData("--io ring --zero-copy auto --batch on")]
    [Trait("kernel", "7.3")]
    public async Task ReissueLosesNothingWhenTheDaemonIsKilledMidVerify(string dataPath)
    {
        VmEnvironment.RequireDriver();
        var batch = dataPath.EndsWith("--batch on", StringComparison.Ordinal);
        if (batch && !ZeroCopyTests.BatchOffered)
        {
            dataPath = dataPath.Replace("--batch on", "", StringComparison.Ordinal);
        }
        Lifecycle.CreateImage(Image, 128 << 20);
        try
        {
            var dev = CliDevices.Add($"-t loop -f {Image} -q 2 --recovery reissue {dataPath}");
            var id = CliDevices.IdOf(dev);
            var pid = Lifecycle.DaemonPid(id);
            Assert.Equal(batch && ZeroCopyTests.BatchOffered, CliDevices.List()[id].GetProperty("batch").GetBoolean());
            var data = CliDevices.List()[id].GetProperty("data").GetString();
            using (var control = ControlDevice.Open())
            {
                var zeroCopy = dataPath.Length > 0 && (control.GetFeatures() & UblkFeatures.AutoBufReg) != 0;
                Assert.True(zeroCopy == (data == "zero-copy"), $"the device's data path is {data}");
            }
            var fio = Task.Run(() => Verify(dev, "32M", 11), TestContext.Current.CancellationToken);
            var writes = Lifecycle.WaitForWrites(dev, 250, fio, TimeSpan.FromMinutes(2));
            Lifecycle.Kill9(pid);
            var recover = Lifecycle.Recover(id);
            var newPid = Lifecycle.WaitForNewDaemon(id, pid, TimeSpan.FromSeconds(30));
            var r = await fio;
            VmEnvironment.Figure($"killed daemon {pid} after {writes} writes; recover took {Lifecycle.Seconds(recover)}; new daemon {newPid}; fio: {r.Summary}");
            Fio.AssertVerified(r);
            CliDevices.Del(id);
            Assert.False(Processes.IsAlive(newPid), $"the recovered daemon (pid {newPid}) outlived del");
            Assert.False(File.Exists(DeviceRecord.PathFor(id)), "the device record outlived del");
        }
        finally
        {
            Lifecycle.CleanUp();
            File.Delete(Image);
        }
    }

    [Fact]
    public async Task RecoveryOnFailsOnlyTheRequestsTheDeadDaemonHeld()
    {
        VmEnvironment.RequireDriver();
        Lifecycle.CreateImage(Image, 128 << 20);
        try
        {
            var dev = CliDevices.Add($"-t loop -f {Image} -q 2 --recovery on");
            var id = CliDevices.IdOf(dev);
            var pid = Lifecycle.DaemonPid(id);
            // Writes only (a failed write would fail a verify by design): fio counts the errors and goes on.
            var fio = Task.Run(() => FioErrorRun.Run(dev, FioTimeout, "--rw=randwrite", "--bsrange=4k-128k", "--size=32M", "--offset_increment=32M", "--randseed=12"),
                TestContext.Current.CancellationToken);
            var writesAtKill = Lifecycle.WaitForWrites(dev, 250, fio, TimeSpan.FromMinutes(2));
            Lifecycle.Kill9(pid);
            Lifecycle.WaitForState(id, DeviceState.Quiesced, TimeSpan.FromSeconds(30));

            // IO that arrives while no daemon serves is held, not failed: it completes after recovery.
            var pattern = new byte[64 << 10];
            new Random(12).NextBytes(pattern);
            var held = Task.Run(() => DirectIo.Write(dev, 100 << 20, pattern), TestContext.Current.CancellationToken);
            await Task.Delay(1500, TestContext.Current.CancellationToken);
            Assert.False(held.IsCompleted, $"a write to the quiesced device did not wait for recovery: {held.Exception?.InnerException?.Message ?? "it completed"}");
            var writesAtRecover = Lifecycle.IoCounts(dev).Writes;
            var recover = Lifecycle.Recover(id);
            var newPid = Lifecycle.WaitForNewDaemon(id, pid, TimeSpan.FromSeconds(30));
            await held.WaitAsync(TimeSpan.FromSeconds(60), TestContext.Current.CancellationToken);
            Assert.Equal(pattern, DirectIo.Read(dev, 100 << 20, pattern.Length));

            var r = await fio;
            var writesAtEnd = Lifecycle.IoCounts(dev).Writes;
            VmEnvironment.Figure($"killed daemon {pid} after {writesAtKill} writes; recover took {Lifecycle.Seconds(recover)}; new daemon {newPid}; " +
                $"{writesAtEnd - writesAtRecover} writes after recovery; fio: {r.Summary}");
            // What the dead daemon held is at most what fio had in flight: 2 jobs x iodepth 32.
            Assert.True(r.TotalErrors is >= 1 and <= 64, $"expected 1 to 64 failed requests (the ones in flight in the dead daemon), got {r.TotalErrors}: {r.Summary}\n{r.Output}");
            Assert.True(r.FirstError == Errno.EIO, $"the failed requests failed with errno {r.FirstError}, not EIO");
            Assert.True(writesAtEnd - writesAtRecover > 100, $"fio wrote only {writesAtEnd - writesAtRecover} times after recovery");
            // fio wrote everything it was to write, less the failures.
            Assert.True(r.WriteIos > writesAtKill, $"fio stopped at the kill: {r.Summary}");

            // The recovered device is whole: a full verify passes.
            Fio.AssertVerified(Verify(dev, "16M", 13));
            CliDevices.Del(id);
            Assert.False(Processes.IsAlive(newPid), $"the recovered daemon (pid {newPid}) outlived del");
        }
        finally
        {
            Lifecycle.CleanUp();
            File.Delete(Image);
        }
    }

    [Fact]
    public async Task RecoveryOffTakesTheDeviceDownWithErrorsAndNoHang()
    {
        VmEnvironment.RequireDriver();
        Lifecycle.CreateImage(Image, 128 << 20);
        try
        {
            var dev = CliDevices.Add($"-t loop -f {Image} -q 2");
            var id = CliDevices.IdOf(dev);
            var pid = Lifecycle.DaemonPid(id);
            // Time-based: without the kill, this would run for two minutes.
            var fio = Task.Run(() => Fio.Run(dev, TimeSpan.FromMinutes(4), "--rw=randwrite", "--bsrange=4k-128k", "--size=32M", "--offset_increment=32M",
                "--time_based", "--runtime=120"), TestContext.Current.CancellationToken);
            var writes = Lifecycle.WaitForWrites(dev, 250, fio, TimeSpan.FromMinutes(2));
            var sw = Stopwatch.StartNew();
            Lifecycle.Kill9(pid);
            var r = await fio.WaitAsync(TimeSpan.FromSeconds(90), TestContext.Current.CancellationToken);
            var fioEnded = sw.Elapsed;
            Assert.True(VmEnvironment.WaitFor(() => !File.Exists(dev), TimeSpan.FromSeconds(30)), $"{dev} outlived its daemon by 30 s");
            var nodeGone = sw.Elapsed;
            VmEnvironment.Figure($"killed daemon {pid} after {writes} writes; fio ended {Lifecycle.Seconds(fioEnded)} later, {dev} was gone after {Lifecycle.Seconds(nodeGone)}; fio: {r.Summary}");
            Assert.True(r.Error != 0 || r.ExitCode != 0, $"fio saw no error although the device died under it: {r}");
            Assert.True(fioEnded < TimeSpan.FromSeconds(60), $"fio took {Lifecycle.Seconds(fioEnded)} to fail");

            // The kernel keeps the dead device (ublkcN) until someone deletes it; it cannot be recovered.
            Assert.Equal(DeviceState.Dead, Lifecycle.State(id));
            Lifecycle.AssertRefused($"recover -n {id}", "without recovery");
            sw.Restart();
            CliDevices.Del(id);
            VmEnvironment.Log($"del of the dead device took {Lifecycle.Seconds(sw.Elapsed)}");
            Assert.False(File.Exists(DeviceRecord.PathFor(id)), "the device record outlived del");
            Assert.Empty(VmEnvironment.CliProcesses());
        }
        finally
        {
            Lifecycle.CleanUp();
            File.Delete(Image);
        }
    }

    [Fact]
    public async Task TwentyKillRecoverCyclesUnderLoadLoseNothing()
    {
        VmEnvironment.RequireDriver();
        Lifecycle.CreateImage(Image, 64 << 20);
        try
        {
            var dev = CliDevices.Add($"-t loop -f {Image} -q 2 --recovery reissue");
            var id = CliDevices.IdOf(dev);
            var random = new Random(2024);
            var recoverTimes = new List<double>();
            long verified = 0;
            var total = Stopwatch.StartNew();
            for (var cycle = 0; cycle < 20; cycle++)
            {
                var sw = Stopwatch.StartNew();
                var pid = Lifecycle.DaemonPid(id);
                var start = Lifecycle.IoCounts(dev).Writes;
                // 2 x 8 MiB of 4-128 KiB writes is about 250; kill somewhere in the first half.
                var killAfter = random.Next(10, 120);
                var fio = Task.Run(() => Verify(dev, "8M", 100 + cycle), TestContext.Current.CancellationToken);
                var writes = Lifecycle.WaitForWrites(dev, start + killAfter, fio, TimeSpan.FromMinutes(2)) - start;
                Lifecycle.Kill9(pid);
                var recover = Lifecycle.Recover(id);
                var newPid = Lifecycle.WaitForNewDaemon(id, pid, TimeSpan.FromSeconds(30));
                var r = await fio;
                Assert.True(r.ExitCode == 0 && r.Error == 0, $"cycle {cycle}: fio failed: {r}");
                Fio.AssertVerified(r);
                verified += r.ReadBytes;
                recoverTimes.Add(recover.TotalSeconds);
                VmEnvironment.Log($"cycle {cycle}: killed {pid} after {writes} writes, recover {Lifecycle.Seconds(recover)}, new daemon {newPid}, cycle {Lifecycle.Seconds(sw.Elapsed)}: {r.Summary}");
            }
            VmEnvironment.Figure($"20 kill/recover cycles in {Lifecycle.Seconds(total.Elapsed)}, 0 verify errors, {verified >> 20} MiB verified; " +
                $"recover command: median {Lifecycle.Seconds(Lifecycle.Median(recoverTimes))}, max {Lifecycle.Seconds(recoverTimes.Max())}");
            CliDevices.Del(id);
            Assert.Empty(VmEnvironment.CliProcesses());
        }
        finally
        {
            Lifecycle.CleanUp();
            File.Delete(Image);
        }
    }
}
