using System.Diagnostics;
using UblkSharp.Runtime;
using UblkSharp.Runtime.Metrics;
using UblkSharp.Targets;
using UblkSharp.Ublk;

namespace UblkSharp.VmTests;

/// <summary>
/// fio crc32c verify with 512 B to 1 MiB blocks through 1 and 4 queues, in every data path the kernel
/// offers (zero copy and copy, batched and not) and on every target that takes the ring path (loop
/// over a file, with direct IO and over a block device; cow; nbd). The guest has 4 CPUs here (the
/// harness boots classes with the trait cpus=4 so) and fio runs a job pinned on each, so each of 4
/// queues gets IO: checked per queue.
/// </summary>
[Trait("kernel", "7.3")]
[Trait("cpus", "4")]
public class QueueCountTests
{
    private const string Dir = "/tmp/ublksharp-queues";
    private const int Jobs = 4;
    private const int MiBPerJob = 16;

    private static bool Offered(UblkFeatures feature)
    {
        using var control = ControlDevice.Open();
        return (control.GetFeatures() & feature) != 0;
    }

    [Theory]
    [InlineData("loop", "zero-copy", true, 4)]
    [InlineData("loop", "zero-copy", true, 1)]
    [InlineData("loop-direct", "zero-copy", true, 4)]
    [InlineData("loop-direct", "zero-copy", false, 1)]
    [InlineData("loop-blockdev", "zero-copy", true, 4)]
    [InlineData("loop-blockdev", "zero-copy", false, 4)]
    [InlineData("loop", "copy", true, 4)]
    [InlineData("loop", "copy", false, 4)]
    [InlineData("loop", "copy", true, 1)]
    [InlineData("cow", "zero-copy", true, 4)]
    [InlineData("cow", "zero-copy", false, 1)]
    [InlineData("cow", "copy", true, 1)]
    [InlineData("nbd", "zero-copy", true, 4)]
    [InlineData("nbd", "zero-copy", false, 1)]
    [InlineData("nbd", "copy", true, 4)]
    // SUPPORT_ZERO_COPY's explicit registration (6.15+), forced where AUTO_BUF_REG is offered too.
    [InlineData("loop-direct", "explicit", true, 4)]
    [InlineData("cow", "explicit", false, 1)]
    [InlineData("nbd", "explicit", true, 4)]
    public void FioVerifyPassesThroughEachQueue(string kind, string dataPath, bool batch, int queues)
    {
        VmEnvironment.RequireDriver();
        Assert.True(Environment.ProcessorCount >= Jobs, $"the guest has {Environment.ProcessorCount} CPUs: this class needs {Jobs} (tools/ublksharp-vm -c {Jobs})");
        Directory.CreateDirectory(Dir);
        var image = Path.Combine(Dir, "disk.img");
        using (var f = File.Create(image))
        {
            f.SetLength((long)Jobs * MiBPerJob << 20);
        }
        string? loopDev = null;
        Process? nbdkit = null;
        try
        {
            var options = new Dictionary<string, string> { ["io"] = "ring" };
            switch (kind)
            {
                case "loop":
                    options["file"] = image;
                    break;
                case "loop-direct":
                    options["file"] = image;
                    options["direct-io"] = "on";
                    break;
                case "loop-blockdev":
                    loopDev = VmEnvironment.ShOk($"losetup -f --show {image}").Trim();
                    options["file"] = loopDev;
                    break;
                case "cow":
                    options["file"] = Path.Combine(Dir, "overlay.cow");
                    options["backing"] = image;
                    options["create"] = "on";
                    break;
                case "nbd":
                    options.Clear();
                    var socket = Path.Combine(Dir, "nbdkit.sock");
                    nbdkit = NbdVmTests.StartNbdkit(socket, "memory", $"{Jobs * MiBPerJob}M");
                    options["uri"] = $"nbd+unix:///?socket={socket}";
                    break;
            }
            var target = TargetFactory.Create(kind.StartsWith("loop", StringComparison.Ordinal) ? "loop" : kind, options);
            Exception? fatal = null;
            var deviceOptions = new DeviceOptions
            {
                Queues = queues,
                Depth = 64,
                MaxIoBytes = 1 << 20,
                ZeroCopy = dataPath switch { "zero-copy" => ZeroCopyMode.Auto, "explicit" => ZeroCopyMode.Explicit, _ => ZeroCopyMode.Off },
                Batch = batch ? BatchMode.Auto : BatchMode.Off,
            };
            using var owned = target;
            if (dataPath == "explicit" && !Offered(UblkFeatures.SupportZeroCopy))
            {
                // 6.12: what is left to check is the refusal, with the kernel it needs.
                var e = Assert.Throws<NotSupportedException>(() => UblkDevice.Create(target, deviceOptions));
                Assert.Contains("SUPPORT_ZERO_COPY", e.Message, StringComparison.Ordinal);
                return;
            }
            using (var device = UblkDevice.Create(target, deviceOptions, e => fatal = e))
            {
                // Where the kernel lacks a mode (6.12 has neither), the same case runs the fallback.
                Assert.Equal(queues, device.Info.nr_hw_queues);
                var usesBatch = (device.Info.flags & (ulong)UblkFeatures.BatchIo) != 0;
                Assert.Equal(batch && Offered(UblkFeatures.BatchIo), usesBatch);
                var usesZeroCopy = (device.Info.flags & (ulong)(UblkFeatures.AutoBufReg | UblkFeatures.SupportZeroCopy)) != 0;
                Assert.Equal(dataPath == "explicit" || (dataPath == "zero-copy" && Offered(UblkFeatures.AutoBufReg)), usesZeroCopy);
                Assert.Equal(dataPath == "explicit", (device.Info.flags & (ulong)UblkFeatures.AutoBufReg) == 0 && usesZeroCopy);
                var r = Fio.Run(device.BlockPath, TimeSpan.FromMinutes(4), "--rw=randwrite", "--bsrange=512-1m", "--verify=crc32c",
                    "--do_verify=1", "--verify_state_save=0", $"--numjobs={Jobs}", $"--size={MiBPerJob}M", $"--offset_increment={MiBPerJob}M");
                Fio.AssertVerified(r);
                Assert.Null(fatal);
                Assert.Equal(0, device.Errors);
                Assert.Equal(0, device.ExactlyOnceViolations);
                Assert.Equal(0, device.Queues.Sum(q => q.BatchCommitFailures));
                var (served, fellBack) = ZeroCopyTests.Counters(device);
                var perQueue = string.Join(", ", device.Queues.Select(q => q.Completed));
                VmEnvironment.Log($"{kind}, {(usesZeroCopy ? "zero copy" : "copy")}, batch {(usesBatch ? "on" : "off")}, {queues} queues: requests per queue {perQueue}; {served} zero copy, {fellBack} fell back; {r.Summary}");
                Assert.All(device.Queues, q => Assert.True(q.Completed > 0, $"queue {q.QueueId} served nothing: {perQueue}"));
                Assert.Equal(0, fellBack);
                // The block layer merges fio's IOs into fewer requests, and udev's probe reads a few
                // KiB besides: what the device served is the measure.
                var total = device.Stats().Total;
                var dataRequests = total.Requests[(int)StatOp.Read] + total.Requests[(int)StatOp.Write];
                var dataBytes = total.Bytes[(int)StatOp.Read] + total.Bytes[(int)StatOp.Write];
                Assert.True(dataBytes >= r.ReadBytes + r.WriteBytes, $"the device served {dataBytes} bytes, fio moved {r.ReadBytes + r.WriteBytes}");
                if (usesZeroCopy)
                {
                    Assert.Equal(dataRequests, served);
                }
                else
                {
                    Assert.Equal(0, served);
                }
            }
        }
        finally
        {
            if (nbdkit is not null)
            {
                NbdVmTests.Stop(nbdkit);
                nbdkit.Dispose();
            }
            if (loopDev is not null)
            {
                VmEnvironment.Sh($"losetup -d {loopDev}");
            }
            Directory.Delete(Dir, recursive: true);
        }
    }
}
