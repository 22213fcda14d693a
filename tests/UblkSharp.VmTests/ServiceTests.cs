using System.Diagnostics;
using System.Net.Sockets;
using System.Text;
using UblkSharp.Interop;
using UblkSharp.Ublk;

namespace UblkSharp.VmTests;

/// <summary>
/// `ublksharp run NAME`, the command `ublksharp@NAME.service` runs, under a stand-in for systemd: a
/// unix datagram socket named by NOTIFY_SOCKET. READY=1 must come only once the device serves IO;
/// a kill -9 and a new start (Restart=on-failure) recover the device with its data and no new
/// device node; SIGTERM sends STOPPING=1 and deletes the device. The guest has no systemd: the
/// unit file itself is checked on the host (systemd-analyze verify, ServiceUnitTests).
/// </summary>
[Trait("boot", "shared")]
public class ServiceTests
{
    private const string Dir = "/tmp/ublksharp-service";
    private const string Image = Dir + "/disk.img";
    private const uint Id = 7;

    [Fact]
    public void RunNotifiesReadyOnlyWhenServingRecoversAfterACrashAndStopsOnSigterm()
    {
        VmEnvironment.RequireDriver();
        Directory.CreateDirectory(Dir);
        Lifecycle.CreateImage(Image, 64 << 20);
        var notifyPath = Path.Combine(Dir, "notify");
        File.Delete(notifyPath);
        File.WriteAllText(Path.Combine(Dir, "disk.json"),
            $$"""{ "id": {{Id}}, "target": "loop", "options": { "file": "{{Image}}" }, "recovery": "reissue", "queues": 2, "depth": 64, "metrics": "unix://{{Dir}}/metrics.sock" }""");
        using var notify = new Socket(AddressFamily.Unix, SocketType.Dgram, ProtocolType.Unspecified);
        notify.Bind(new UnixDomainSocketEndPoint(notifyPath));
        var dev = $"/dev/ublkb{Id}";
        Process? run = null;
        try
        {
            // 1. The first start adds the device; READY=1 comes once it serves IO.
            run = Start(notifyPath);
            var ready = Receive(notify, "READY=1", run, TimeSpan.FromMinutes(2));
            AssertServing(dev, ready);
            Assert.Equal(run.Id, CliDevices.DaemonPid(Id));
            Assert.Contains($"MAINPID={run.Id}", ready, StringComparison.Ordinal);
            VmEnvironment.ShOk($"dd if=/dev/urandom of={Dir}/pattern bs=64k count=16 status=none && dd if={Dir}/pattern of={dev} bs=64k oflag=direct status=none");
            var rdev = VmEnvironment.ShOk($"stat -c '%t:%T' {dev}").Trim();

            // 2. A crash: the device waits with its IO held; the next start recovers it, data and node intact.
            Lifecycle.Kill9(run.Id);
            run.WaitForExit(TimeSpan.FromSeconds(20));
            Lifecycle.WaitForState(Id, DeviceState.Quiesced, TimeSpan.FromSeconds(30));
            run.Dispose();
            run = Start(notifyPath);
            ready = Receive(notify, "READY=1", run, TimeSpan.FromMinutes(2));
            AssertServing(dev, ready);
            Assert.Equal(run.Id, CliDevices.DaemonPid(Id));
            Assert.Equal(rdev, VmEnvironment.ShOk($"stat -c '%t:%T' {dev}").Trim());
            VmEnvironment.ShOk($"cmp -n 1048576 {Dir}/pattern {dev}");
            // The recovered daemon serves the description's metrics socket again, with its own counts.
            var scrape = VmEnvironment.ShOk($"curl -sS --max-time 10 --unix-socket {Dir}/metrics.sock http://localhost/metrics");
            Assert.Contains($"ublksharp_requests_total{{device=\"{Id}\",queue=\"0\",op=\"read\"}}", scrape, StringComparison.Ordinal);
            var log = run.StandardError.ReadLine(); // written before the recovery began

            // 3. SIGTERM: STOPPING=1, the device deleted, a clean exit.
            Assert.True(Processes.Signal(run.Id, Processes.SIGTERM));
            Receive(notify, "STOPPING=1", null, TimeSpan.FromMinutes(1));
            Assert.True(run.WaitForExit(TimeSpan.FromSeconds(60)), "run did not exit within 60 s of SIGTERM");
            Assert.Equal(0, run.ExitCode);
            // DEL_DEV_ASYNC: the kernel frees the id once the last reference is gone, a moment later.
            Assert.True(Lifecycle.PollFor(() => Lifecycle.Info(Id) is null && !File.Exists(dev), TimeSpan.FromSeconds(10)), $"device {Id} outlived the stop");
            VmEnvironment.Figure($"SERVICE on {VmEnvironment.KernelRelease}: READY after the device served IO, twice (add, then recovery after kill -9; its log began: {log})");
        }
        finally
        {
            if (run is { HasExited: false })
            {
                run.Kill();
            }
            run?.Dispose();
            Lifecycle.CleanUp();
            Directory.Delete(Dir, recursive: true);
        }
    }

    /// <summary>A description file that is wrong is refused with the file and the reason, before any device exists.</summary>
    [Fact]
    public void ABadDescriptionIsRefusedBeforeAnyDeviceExists()
    {
        VmEnvironment.RequireDriver();
        Directory.CreateDirectory(Dir);
        try
        {
            File.WriteAllText(Path.Combine(Dir, "bad.json"), $$"""{ "id": {{Id}}, "target": "loop", "options": { "file": "{{Dir}}/missing.img" } }""");
            var (code, output) = VmEnvironment.Run("/usr/bin/env", $"UBLKSHARP_CONFIG_DIR={Dir} {VmEnvironment.Cli} run bad", TimeSpan.FromMinutes(1));
            Assert.NotEqual(0, code);
            Assert.Contains("missing.img", output, StringComparison.Ordinal);
            Assert.DoesNotContain("   at ", output, StringComparison.Ordinal);
            Assert.Null(Lifecycle.Info(Id));
        }
        finally
        {
            Lifecycle.CleanUp();
            Directory.Delete(Dir, recursive: true);
        }
    }

    private static Process Start(string notifyPath)
    {
        var psi = new ProcessStartInfo(VmEnvironment.Cli, ["run", "disk"]) { RedirectStandardError = true, RedirectStandardOutput = true, UseShellExecute = false };
        psi.Environment["NOTIFY_SOCKET"] = notifyPath;
        psi.Environment["UBLKSHARP_CONFIG_DIR"] = Dir;
        return Process.Start(psi)!;
    }

    // The next datagram that has `expected` among its lines; fails if `run` ends first or on timeout.
    private static string Receive(Socket socket, string expected, Process? run, TimeSpan timeout)
    {
        var buffer = new byte[4096];
        var deadline = Stopwatch.GetTimestamp() + (long)(timeout.TotalSeconds * Stopwatch.Frequency);
        while (Stopwatch.GetTimestamp() < deadline)
        {
            if (socket.Poll(200_000, SelectMode.SelectRead))
            {
                var text = Encoding.UTF8.GetString(buffer, 0, socket.Receive(buffer));
                VmEnvironment.Log($"sd_notify: {text.Replace('\n', ' ')}");
                if (text.Split('\n').Contains(expected))
                {
                    return text;
                }
                continue;
            }
            if (run is { HasExited: true })
            {
                Assert.Fail($"run exited {run.ExitCode} before {expected}: {run.StandardError.ReadToEnd()}");
            }
        }
        Assert.Fail($"no {expected} within {timeout.TotalSeconds} s");
        return "";
    }

    // At the moment READY arrives the device is live and a direct read of it completes.
    private static void AssertServing(string dev, string ready)
    {
        Assert.Equal(DeviceState.Live, Lifecycle.State(Id));
        VmEnvironment.ShOk($"dd if={dev} of=/dev/null bs=4k count=16 iflag=direct status=none", TimeSpan.FromSeconds(30));
        Assert.Contains($"STATUS=serving {dev}", ready, StringComparison.Ordinal);
    }
}
