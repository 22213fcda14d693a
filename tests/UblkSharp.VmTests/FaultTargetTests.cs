using UblkSharp.Interop;
using UblkSharp.Runtime;
using UblkSharp.Targets;

namespace UblkSharp.VmTests;

/// <summary>
/// The fault target: retryable faults (short IO, EAGAIN, delays) are retried by the runtime and
/// never seen by the client (see also <see cref="FioVerifyTests"/>, which runs the same schedule
/// through the CLI); hard faults (EIO) reach the client, and the daemon and device live on.
/// </summary>
public class FaultTargetTests
{
    [Fact]
    public void RetryableFaultsAreRetriedAndInvisible()
    {
        VmEnvironment.RequireDriver();
        Exception? fatal = null;
        var schedule = new FaultSchedule { Seed = 7, ShortIo = 0.2, Again = 0.1, Delay = 0.05 };
        using var target = new FaultTarget(new MemoryTarget(128 << 20), schedule);
        using var device = UblkDevice.Create(target, new DeviceOptions { Queues = 2, Depth = 64 }, e => fatal = e);
        var r = Fio.Verify(device.BlockPath, "32M", TimeSpan.FromMinutes(4));
        Fio.AssertVerified(r);
        Assert.Null(fatal);
        Assert.Equal(0, device.Errors);
        // The faults did happen: with 30 % of the backend steps short or EAGAIN, thousands were retried.
        Assert.True(device.Retries > r.TotalIos / 10, $"{device.Retries} backend steps retried for {r.TotalIos} IOs");
        VmEnvironment.Log($"{device.Completed} requests, {device.Retries} backend steps retried");
    }

    [Fact]
    public void HardFaultsReachTheClientAndTheDaemonKeepsServing()
    {
        VmEnvironment.RequireDriver();
        var since = DateTime.UtcNow;
        try
        {
            var dev = CliDevices.Add("-t fault --base mem --size 128M --eio 0.05 --seed 7 -q 2");
            var id = CliDevices.IdOf(dev);
            var pid = CliDevices.DaemonPid(id);

            var r = Fio.Verify(dev, "32M", TimeSpan.FromMinutes(4));
            Assert.True(r.ExitCode != 0 && r.Error == Errno.EIO, $"fio did not report EIO: {r}");
            Assert.Contains("Input/output error", r.Stderr, StringComparison.Ordinal);

            // The daemon is alive, the device live, and it still serves IO (each request fails with
            // probability 5 %, so some of ten reads succeed).
            Assert.True(Processes.IsAlive(pid), $"the daemon (pid {pid}) died of the injected faults:\n{CliDevices.DaemonLogs(since)}");
            Assert.Equal("live", CliDevices.List()[id].GetProperty("state").GetString());
            var served = 0;
            for (var i = 0; i < 10; i++)
            {
                try
                {
                    DirectIo.Read(dev, i * 65536L, 65536);
                    served++;
                }
                catch (IOException)
                {
                }
            }
            Assert.True(served > 0, "no read succeeded after the faults");
            // The daemon logged the failures it passed on.
            Assert.Contains("failed: EIO", CliDevices.DaemonLogs(since), StringComparison.Ordinal);

            CliDevices.Del(id);
            Assert.True(VmEnvironment.WaitFor(() => !Processes.IsAlive(pid), TimeSpan.FromSeconds(10)), $"the daemon (pid {pid}) outlived del");
        }
        finally
        {
            CliDevices.CleanUp();
        }
    }
}
