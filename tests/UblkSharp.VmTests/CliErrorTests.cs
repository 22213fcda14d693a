using UblkSharp.Ublk;

namespace UblkSharp.VmTests;

/// <summary>
/// Every way `ublksharp add` and `del` are expected to fail: exit code 1, one line that says what is
/// wrong (no stack trace), and nothing left behind (no device, no daemon).
/// </summary>
[Trait("boot", "shared")]
public class CliErrorTests
{
    [Theory]
    [InlineData("-t mem --size 12X", "bad size '12X'")]
    [InlineData("-t mem --size 0", "bad size '0'")]
    [InlineData("-t mem", "needs --size")]
    [InlineData("-t bogus --size 1M", "unknown target type 'bogus'")]
    [InlineData("-t loop -f /tmp/ublksharp-missing.img", "/tmp/ublksharp-missing.img: no such file")]
    [InlineData("-t loop -f /nonexistent-dir/disk.img", "/nonexistent-dir/disk.img: no such file")]
    [InlineData("-t loop -f /tmp", "/tmp is a directory")]
    [InlineData("-t mem --size 64M -q 0", "Queues must be 1 to")]
    [InlineData("-t mem --size 64M -d 0", "queue depth must be 1 to")]
    [InlineData("-t mem --size 64M -d 5000", "not 5000")]
    [InlineData("-t fault --base mem --size 64M --eio 2", "bad --eio '2'")]
    public void BadAddIsRefusedAndLeavesNothing(string args, string message)
    {
        AssertRefused("add " + args, message);
    }

    [Fact]
    public void UnknownDeviceIdIsRefused()
    {
        VmEnvironment.RequireDriver();
        Assert.DoesNotContain(999u, VmEnvironment.DeviceIds());
        AssertRefused("del -n 999", "no ublk device 999");
    }

    [Fact]
    public void AStateDirectoryOthersMayWriteIsRefused()
    {
        VmEnvironment.RequireDriver();
        // Records name the pids del signals and the targets recover rebuilds: nobody but root may write them.
        const string dir = "/tmp/ublksharp-open-run";
        VmEnvironment.ShOk($"rm -rf {dir} && mkdir {dir} && chmod 0777 {dir}");
        var devices = VmEnvironment.DeviceIds();
        try
        {
            var env = new Dictionary<string, string> { ["UBLKSHARP_RUN_DIR"] = dir };
            foreach (var args in new[] { "add -t mem --size 64M", "recover -n 0" })
            {
                var (code, stdout, stderr) = VmEnvironment.Exec(VmEnvironment.Cli, [.. args.Split(' ')], TimeSpan.FromMinutes(2), env);
                Assert.True(code == 1, $"{args} with an open state directory exited {code}:\n{stdout}{stderr}");
                Assert.Contains($"refusing the state directory {dir}: group or others may write to it", stderr, StringComparison.Ordinal);
                AssertOneLine(stderr);
            }
            Assert.Equal(devices, VmEnvironment.DeviceIds());
            Assert.Empty(Directory.GetFileSystemEntries(dir));
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }

    [Fact]
    public void TinyBackingFileIsRefused()
    {
        const string tiny = "/tmp/ublksharp-tiny.img";
        File.WriteAllBytes(tiny, new byte[100]);
        try
        {
            AssertRefused($"add -t loop -f {tiny}", "is 100 bytes");
        }
        finally
        {
            File.Delete(tiny);
        }
    }

    [Fact]
    public void NonRootIsRefused()
    {
        VmEnvironment.RequireDriver();
        Assert.True(File.Exists("/usr/bin/setpriv"), "setpriv (util-linux) is needed to run the CLI as nobody");
        var devices = VmEnvironment.DeviceIds();
        var processes = VmEnvironment.CliProcesses();
        // dotnet needs a writable home; nobody's is not.
        var env = new Dictionary<string, string> { ["HOME"] = "/tmp", ["DOTNET_CLI_HOME"] = "/tmp" };
        foreach (var args in new[] { "add -t mem --size 64M", "list", "del -n 0" })
        {
            var (code, stdout, stderr) = VmEnvironment.Exec("setpriv",
                ["--reuid=65534", "--regid=65534", "--clear-groups", VmEnvironment.Cli, .. args.Split(' ')], TimeSpan.FromMinutes(2), env);
            Assert.True(code == 1, $"{args} as nobody exited {code}:\n{stdout}{stderr}");
            Assert.Contains("need root", stderr, StringComparison.Ordinal);
            AssertOneLine(stderr);
        }
        Assert.Equal(devices, VmEnvironment.DeviceIds());
        Assert.Empty(VmEnvironment.CliProcesses().Except(processes));
    }

    [Fact]
    public void UnwritableBackingFileNeedsReadOnly()
    {
        VmEnvironment.RequireDriver();
        // A read-only file system: root may not write there either.
        const string ro = "/tmp/ublksharp-ro";
        var content = new byte[1 << 20];
        new Random(5).NextBytes(content);
        Directory.CreateDirectory(ro);
        try
        {
            VmEnvironment.ShOk($"mount -t tmpfs -o size=8M tmpfs {ro}");
            File.WriteAllBytes($"{ro}/disk.img", content);
            VmEnvironment.ShOk($"mount -o remount,ro {ro}");

            var output = AssertRefused($"add -t loop -f {ro}/disk.img", "cannot open it");
            Assert.Contains("Read-only file system", output, StringComparison.Ordinal);

            var dev = CliDevices.Add($"-t loop -f {ro}/disk.img --read-only");
            Assert.Equal("1", File.ReadAllText($"/sys/block/{Path.GetFileName(dev)}/ro").Trim());
            Assert.Equal(content, DirectIo.Read(dev, 0, content.Length));
            CliDevices.Del(CliDevices.IdOf(dev));
        }
        finally
        {
            CliDevices.CleanUp(ro);
        }
    }

    [Fact]
    public void TakenDeviceIdIsRefusedAndTheFirstDeviceLivesOn()
    {
        VmEnvironment.RequireDriver();
        var processes = VmEnvironment.CliProcesses();
        try
        {
            var dev = CliDevices.Add("-t mem --size 64M -n 5");
            Assert.Equal("/dev/ublkb5", dev);
            var pid = CliDevices.DaemonPid(5);
            AssertRefused("add -t mem --size 64M -n 5", "already exists");
            // The first device's daemon is the only one, and it still serves.
            Assert.Equal([pid], VmEnvironment.CliProcesses().Except(processes));
            Assert.Equal(DeviceState.Live, CliDevices.State(5));
            var data = new byte[65536];
            new Random(6).NextBytes(data);
            DirectIo.Write(dev, 0, data);
            Assert.Equal(data, DirectIo.Read(dev, 0, data.Length));
            CliDevices.Del(5);
        }
        finally
        {
            CliDevices.CleanUp();
        }
    }

    [Fact]
    public void MountedDeviceIsBusyAndStillServes()
    {
        VmEnvironment.RequireDriver();
        const string mnt = "/tmp/ublksharp-busy";
        Directory.CreateDirectory(mnt);
        try
        {
            var dev = CliDevices.Add("-t mem --size 64M -q 2");
            var id = CliDevices.IdOf(dev);
            VmEnvironment.ShOk($"mkfs.ext4 -q -F {dev} && mount {dev} {mnt}");
            File.WriteAllText($"{mnt}/before", "written before del");

            var (code, output) = VmEnvironment.RunCli($"del -n {id}");
            Assert.True(code == 1, $"del of a mounted device exited {code}:\n{output}");
            Assert.Contains("busy", output, StringComparison.Ordinal);
            AssertOneLine(output);

            // Nothing was stopped: the file system reads and writes through the device as before.
            Assert.Equal(DeviceState.Live, CliDevices.State(id));
            var data = new byte[4 << 20];
            new Random(8).NextBytes(data);
            File.WriteAllBytes($"{mnt}/after", data);
            VmEnvironment.ShOk($"sync && echo 3 > /proc/sys/vm/drop_caches");
            Assert.Equal(data, File.ReadAllBytes($"{mnt}/after"));
            Assert.Equal("written before del", File.ReadAllText($"{mnt}/before"));
            VmEnvironment.ShOk($"umount {mnt}");
            VmEnvironment.ShOk($"e2fsck -fn {dev}");
            CliDevices.Del(id);
        }
        finally
        {
            CliDevices.CleanUp(mnt);
        }
    }

    /// <summary>Runs the CLI with <paramref name="args"/>: it must exit 1 saying <paramref name="message"/>, and change nothing.</summary>
    private static string AssertRefused(string args, string message)
    {
        VmEnvironment.RequireDriver();
        var devices = VmEnvironment.DeviceIds();
        var processes = VmEnvironment.CliProcesses();
        var (code, output) = VmEnvironment.RunCli(args);
        Assert.True(code == 1, $"{args} exited {code}:\n{output}");
        Assert.Contains(message, output, StringComparison.Ordinal);
        AssertOneLine(output);
        Assert.Equal(devices, VmEnvironment.DeviceIds());
        // A daemon started for the request (e.g. one that found its id taken) has gone.
        Assert.True(VmEnvironment.WaitFor(() => VmEnvironment.CliProcesses().Order().SequenceEqual(processes.Order()), TimeSpan.FromSeconds(10)),
            $"{args} left processes behind: {string.Join(' ', VmEnvironment.CliProcesses().Except(processes))}");
        return output;
    }

    private static void AssertOneLine(string output)
    {
        Assert.DoesNotContain("   at ", output, StringComparison.Ordinal);
        Assert.True(output.Trim().Split('\n').Length == 1, $"expected one line, got:\n{output}");
        Assert.StartsWith("ublksharp: ", output.Trim(), StringComparison.Ordinal);
    }
}
