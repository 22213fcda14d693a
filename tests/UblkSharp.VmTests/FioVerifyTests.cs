namespace UblkSharp.VmTests;

/// <summary>
/// fio through CLI daemons on 2-queue devices, one fio job pinned to each CPU so that both queues
/// serve IO (checked on the daemon's queue threads): crc32c write-then-verify on every target that
/// keeps data, and a read/write mix on the null target, whose reads return no data.
/// </summary>
[Trait("kernel", "7.3")]
[Trait("boot", "shared")]
public class FioVerifyTests
{
    private const string Image = "/tmp/ublksharp-fio.img";

    [Theory]
    [InlineData("mem", "-t mem --size 128M")]
    [InlineData("loop", "-t loop -f " + Image)]
    // Retryable faults only (short IO, EAGAIN, delays): the runtime must hide every one from fio.
    [InlineData("fault-mem", "-t fault --base mem --size 128M --short 0.2 --eagain 0.1 --delay 0.05 --seed 7")]
    [InlineData("fault-loop", "-t fault --base loop -f " + Image + " --short 0.2 --eagain 0.1 --delay 0.05 --seed 7")]
    public void Crc32cVerifyPassesOnBothQueues(string name, string target)
    {
        VmEnvironment.RequireDriver();
        using (var f = File.Create(Image))
        {
            f.SetLength(128 << 20);
        }
        try
        {
            var dev = CliDevices.Add($"{target} -q 2");
            var pid = CliDevices.DaemonPid(CliDevices.IdOf(dev));
            var before = CliDevices.QueueThreadCpu(pid);
            var r = Fio.Verify(dev, "32M", TimeSpan.FromMinutes(4));
            VmEnvironment.Log($"{name}: {r.Summary}");
            Fio.AssertVerified(r);
            CliDevices.AssertEveryQueueServed(2, before, CliDevices.QueueThreadCpu(pid));
            CliDevices.Del(CliDevices.IdOf(dev));
            Assert.False(Interop.Processes.IsAlive(pid), $"the daemon (pid {pid}) outlived del");
        }
        finally
        {
            CliDevices.CleanUp();
            File.Delete(Image);
        }
    }

    [Fact]
    public void NullTargetServesRandomReadWriteWithoutErrors()
    {
        VmEnvironment.RequireDriver();
        try
        {
            var dev = CliDevices.Add("-t null --size 1G -q 2");
            var pid = CliDevices.DaemonPid(CliDevices.IdOf(dev));
            var before = CliDevices.QueueThreadCpu(pid);
            var r = Fio.Run(dev, TimeSpan.FromMinutes(2), "--rw=randrw", "--bsrange=4k-128k", "--size=512M", "--offset_increment=512M",
                "--runtime=5", "--time_based");
            VmEnvironment.Log($"null: {r.Summary}");
            Assert.True(r.ExitCode == 0 && r.Error == 0, $"fio failed: {r}");
            Assert.True(r.ReadIos > 1000 && r.WriteIos > 1000, $"too little IO: {r}");
            CliDevices.AssertEveryQueueServed(2, before, CliDevices.QueueThreadCpu(pid));
            CliDevices.Del(CliDevices.IdOf(dev));
        }
        finally
        {
            CliDevices.CleanUp();
        }
    }
}
