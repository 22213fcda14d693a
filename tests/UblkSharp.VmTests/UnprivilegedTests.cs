using System.Diagnostics;
using System.Text.RegularExpressions;
using UblkSharp.Interop;
using UblkSharp.Ublk;

namespace UblkSharp.VmTests;

/// <summary>
/// Devices of a user, not root (UNPRIVILEGED_DEV): uid 1000 adds, lists, serves and deletes its own
/// device, and uid 1001 is refused each of those on it. The guest has no udev, so a thread here does
/// what the rule that `setup-unprivileged` writes would: it runs the rule's own RUN command for each
/// new /dev/ublk[bc]N.
/// </summary>
[Trait("boot", "shared")]
public sealed partial class UnprivilegedTests : IDisposable
{
    private const string Owner = "1000", Stranger = "1001";
    private const string Home = "/tmp/ublksharp-u1000";
    private const string RulesFile = "/tmp/ublksharp-udev/70-ublksharp.rules";
    private readonly UdevEmulation? _udev;
    private readonly string _cli;

    public UnprivilegedTests()
    {
        VmEnvironment.RequireDriver();
        // The users need an executable they may run: the test's own copy lives in a root-only temp directory.
        var dir = "/tmp/ublksharp-users";
        VmEnvironment.ShOk($"mkdir -p {dir} && chmod 755 {dir}");
        _cli = Path.Combine(dir, "ublksharp");
        File.Copy(VmEnvironment.Cli, _cli, overwrite: true);
        foreach (var (path, uid) in new[] { (Home, Owner), (Home + "/run", Owner), ("/tmp/ublksharp-u1001", Stranger), ("/tmp/ublksharp-u1001/run", Stranger) })
        {
            VmEnvironment.ShOk($"mkdir -p {path} && chown {uid}:{uid} {path} && chmod 700 {path}");
        }
        Directory.CreateDirectory(Path.GetDirectoryName(RulesFile)!);
        var (code, output) = VmEnvironment.RunCli($"setup-unprivileged --rules-file {RulesFile}");
        Assert.True(code == 0, $"setup-unprivileged exited {code}:\n{output}");
        Assert.Equal("666", VmEnvironment.ShOk($"stat -c %a {ControlDevice.Path}").Trim());
        var run = RunRegex().Match(File.ReadAllText(RulesFile));
        Assert.True(run.Success, $"{RulesFile} has no RUN+= helper:\n{File.ReadAllText(RulesFile)}");
        Assert.Contains("udev-chown %k", run.Groups[1].Value, StringComparison.Ordinal);
        _udev = new UdevEmulation(run.Groups[1].Value);
    }

    public void Dispose()
    {
        _udev?.Dispose();
        // Whatever a failed test left: root deletes users' devices too.
        foreach (var id in VmEnvironment.DeviceIds())
        {
            VmEnvironment.RunCli($"del -n {id} --force");
        }
        VmEnvironment.Sh($"chmod 600 {ControlDevice.Path}");
    }

    [Fact]
    public void AUserAddsServesAndDeletesTheirOwnDeviceAndAnotherUserIsRefusedEachStep()
    {
        var image = Home + "/disk.img";
        VmEnvironment.ShOk($"truncate -s 64M {image} && chown {Owner}:{Owner} {image}");
        var (code, output) = As(Owner, $"add -t loop -f {image}");
        Assert.True(code == 0, $"add as uid {Owner} exited {code}:\n{output}\n{Logs()}");
        var dev = BlockRegex().Match(output).Value;
        Assert.True(File.Exists(dev), $"add printed no device that exists:\n{output}");
        var id = CliDevices.IdOf(dev);

        // The kernel's record of the device: the user's, unprivileged (root reads it; the prefix is the library's).
        using (var control = ControlDevice.Open())
        {
            var info = control.GetDeviceInfo(id);
            Assert.True((info.flags & (ulong)UblkFeatures.UnprivilegedDev) != 0, $"device {id} flags {UblkFeatureNames.Format((UblkFeatures)info.flags)}");
            Assert.Equal(1000u, info.owner_uid);
        }
        Assert.Equal("1000 1000", VmEnvironment.ShOk($"stat -c '%u %g' {dev}").Trim());
        Assert.Equal("1000", VmEnvironment.ShOk($"stat -c '%u' /dev/ublkc{id}").Trim());
        // Its state lives in the user's runtime directory, owner-only, not in root's.
        var record = $"{Home}/run/ublksharp/{id}.json";
        Assert.True(File.Exists(record), $"no {record}: {VmEnvironment.Sh($"ls -la {Home}/run/ublksharp /run/ublksharp").Output}");
        Assert.Equal("1000 600", VmEnvironment.ShOk($"stat -c '%u %a' {record}").Trim());
        Assert.False(File.Exists($"/run/ublksharp/{id}.json"));

        // The owner serves IO through it: written through the device, found in the image.
        AssertOk(AsUser(Owner, $"dd if=/dev/urandom of={Home}/pattern bs=64k count=16 status=none && dd if={Home}/pattern of={dev} bs=64k oflag=direct status=none && cmp -n 1048576 {Home}/pattern {dev}"));
        AssertOk(VmEnvironment.Sh($"sync && cmp -n 1048576 {Home}/pattern {image}"));
        (code, output) = As(Owner, "list");
        Assert.True(code == 0 && output.Contains($"/dev/ublkb{id}", StringComparison.Ordinal) && output.Contains("UNPRIVILEGED_DEV", StringComparison.Ordinal), $"list as the owner:\n{output}");

        // Another user: cannot read it, delete it or recover it, and does not see it.
        var (readCode, readOutput) = AsUser(Stranger, $"dd if={dev} of=/dev/null bs=4k count=1 status=none");
        Assert.True(readCode != 0 && readOutput.Contains("Permission denied", StringComparison.Ordinal), $"uid {Stranger} read {dev}: {readCode}\n{readOutput}");
        foreach (var verb in new[] { "del", "recover" })
        {
            (code, output) = As(Stranger, $"{verb} -n {id}");
            Assert.True(code != 0 && output.Contains("not yours", StringComparison.Ordinal), $"{verb} as uid {Stranger} exited {code}:\n{output}");
            Assert.DoesNotContain("   at ", output, StringComparison.Ordinal);
        }
        (code, output) = As(Stranger, "list");
        Assert.True(code == 0 && !output.Contains($"/dev/ublkb{id}", StringComparison.Ordinal) && output.Contains("not shown", StringComparison.Ordinal),
            $"list as uid {Stranger} exited {code}:\n{output}");
        Assert.True(VmEnvironment.DeviceIds().Contains(id), $"device {id} is gone after another user's attempts");
        AssertOk(AsUser(Owner, $"cmp -n 1048576 {Home}/pattern {dev}"));

        // The owner's own refusals: the kernel gives users' devices no recovery.
        (code, output) = As(Owner, $"recover -n {id}");
        Assert.True(code != 0 && output.Contains("no user recovery", StringComparison.Ordinal), $"recover as the owner exited {code}:\n{output}");
        (code, output) = As(Owner, $"add -t loop -f {image} --recovery on");
        Assert.True(code != 0 && output.Contains("need a device added by root", StringComparison.Ordinal), $"add --recovery as a user exited {code}:\n{output}");

        (code, output) = As(Owner, $"del -n {id}");
        Assert.True(code == 0, $"del as the owner exited {code}:\n{output}");
        Assert.True(VmEnvironment.WaitFor(() => !VmEnvironment.DeviceIds().Contains(id), TimeSpan.FromSeconds(10)), $"device {id} still exists after its owner's del");
        Assert.False(File.Exists(record), $"{record} outlived the device");
    }

    [Fact]
    public void AUserServesATargetOverNbdAndAsTheirOwnDeviceFromOneDaemon()
    {
        var socket = $"{Home}/serve.sock";
        var psi = new ProcessStartInfo("setpriv") { RedirectStandardOutput = true, RedirectStandardError = true };
        foreach (var a in (string[])["--reuid", Owner, "--regid", Owner, "--clear-groups", "env", $"HOME={Home}", $"XDG_RUNTIME_DIR={Home}/run", "UBLKSHARP_RUN_DIR=",
            _cli, "serve", "-t", "mem", "--size", "64M", "--listen", $"unix://{socket}", "--export", "u", "--ublk"])
        {
            psi.ArgumentList.Add(a);
        }
        using var daemon = Process.Start(psi)!;
        var stderr = new System.Text.StringBuilder();
        daemon.ErrorDataReceived += (_, e) =>
        {
            lock (stderr)
            {
                stderr.AppendLine(e.Data);
            }
        };
        daemon.BeginErrorReadLine();
        try
        {
            Assert.Equal($"unix://{socket}", daemon.StandardOutput.ReadLine());
            var dev = daemon.StandardOutput.ReadLine();
            Assert.True(dev is not null && File.Exists(dev), $"serve --ublk as uid {Owner} printed no device: {dev}\n{stderr}");
            Assert.Equal("1000", VmEnvironment.ShOk($"stat -c '%u' {dev}").Trim());
            // Written through the device, read back over NBD, both by the owner.
            AssertOk(AsUser(Owner, $"dd if=/dev/urandom of={Home}/served bs=64k count=16 status=none && dd if={Home}/served of={dev} bs=64k oflag=direct status=none"));
            AssertOk(AsUser(Owner, $"nbdcopy 'nbd+unix:///u?socket={socket}' - | cmp -n 1048576 {Home}/served -"));
            var (readCode, readOutput) = AsUser(Stranger, $"dd if={dev} of=/dev/null bs=4k count=1 status=none");
            Assert.True(readCode != 0 && readOutput.Contains("Permission denied", StringComparison.Ordinal), $"uid {Stranger} read {dev}: {readCode}\n{readOutput}");
            Processes.Signal(daemon.Id, 15);
            Assert.True(daemon.WaitForExit(60_000), "serve did not stop on SIGTERM");
            Assert.True(daemon.ExitCode == 0, $"serve exited {daemon.ExitCode}:\n{stderr}");
            Assert.True(VmEnvironment.WaitFor(() => !File.Exists(dev), TimeSpan.FromSeconds(20)), $"{dev} is still there");
        }
        finally
        {
            if (!daemon.HasExited)
            {
                daemon.Kill();
                daemon.WaitForExit(10_000);
            }
        }
    }

    [Fact]
    public void WithoutTheUdevRuleAUsersAddSaysWhatIsMissingAndRootCanRemoveWhatIsLeft()
    {
        _udev!.Pause();
        var before = VmEnvironment.DeviceIds();
        var clock = Stopwatch.StartNew();
        var (code, output) = As(Owner, "add -t null --size 64M");
        Assert.True(code != 0 && output.Contains("setup-unprivileged", StringComparison.Ordinal), $"add without the rule exited {code}:\n{output}\n{Logs()}");
        Assert.DoesNotContain("   at ", output, StringComparison.Ordinal);
        Assert.True(clock.Elapsed < TimeSpan.FromSeconds(60), $"the refusal took {clock.Elapsed.TotalSeconds:0} s");
        // The user cannot delete a device whose node is not theirs; the message says root can, and root does.
        foreach (var id in VmEnvironment.DeviceIds().Except(before))
        {
            Assert.Contains($"'ublksharp del -n {id}' as root", output, StringComparison.Ordinal);
            CliDevices.Del(id);
        }
    }

    [Fact]
    public void RootListsAndDeletesAUsersDevice()
    {
        var (code, output) = As(Owner, "add -t null --size 64M");
        Assert.True(code == 0, $"add as uid {Owner} exited {code}:\n{output}\n{Logs()}");
        var id = CliDevices.IdOf(BlockRegex().Match(output).Value);
        var rows = CliDevices.List();
        Assert.True(rows.ContainsKey(id), $"root's list lacks uid {Owner}'s device {id}");
        Assert.Contains("UNPRIVILEGED_DEV", rows[id].GetProperty("flags").GetString(), StringComparison.Ordinal);
        CliDevices.Del(id);
    }

    private (int ExitCode, string Output) As(string uid, string args) => AsUser(uid, $"{_cli} {args}");

    // setpriv, not su: no passwd entry or PAM needed, and no group of root's kept.
    private static (int ExitCode, string Output) AsUser(string uid, string command)
    {
        var home = uid == Owner ? Home : "/tmp/ublksharp-u1001";
        var (code, stdout, stderr) = VmEnvironment.Exec("setpriv", ["--reuid", uid, "--regid", uid, "--clear-groups", "env", $"HOME={home}", $"XDG_RUNTIME_DIR={home}/run",
            "UBLKSHARP_RUN_DIR=", "bash", "-c", command], TimeSpan.FromMinutes(2));
        return (code, stdout + stderr);
    }

    private static void AssertOk((int ExitCode, string Output) result) => Assert.True(result.ExitCode == 0, result.Output);

    private static string Logs() => VmEnvironment.Sh($"tail -n 30 {Home}/run/ublksharp/logs/* 2>/dev/null").Output;

    [GeneratedRegex("RUN\\+=\"([^\"]+)\"")]
    private static partial Regex RunRegex();

    [GeneratedRegex(@"/dev/ublkb\d+")]
    private static partial Regex BlockRegex();

    /// <summary>udev's part, for a guest without udev: the rule's RUN command, as root, once per new ublk node.</summary>
    private sealed class UdevEmulation : IDisposable
    {
        private readonly string[] _command;
        private readonly Thread _thread;
        private readonly HashSet<string> _done = [];
        private volatile bool _stop;
        private volatile bool _paused;

        public UdevEmulation(string run)
        {
            _command = run.Split(' ', StringSplitOptions.RemoveEmptyEntries);
            _thread = new Thread(Loop) { IsBackground = true, Name = "udev emulation" };
            _thread.Start();
        }

        public void Pause() => _paused = true;

        private void Loop()
        {
            while (!_stop)
            {
                if (!_paused)
                {
                    var nodes = Directory.GetFiles("/dev", "ublk*").Where(p => Regex.IsMatch(Path.GetFileName(p), @"^ublk[bc]\d+$")).ToList();
                    _done.IntersectWith(nodes.Select(Key));
                    foreach (var node in nodes)
                    {
                        var key = Key(node);
                        if (_done.Add(key))
                        {
                            var name = Path.GetFileName(node);
                            var (code, stdout, stderr) = VmEnvironment.Exec(_command[0], _command.Skip(1).Select(a => a.Replace("%k", name, StringComparison.Ordinal)), TimeSpan.FromSeconds(30));
                            VmEnvironment.Log($"udev emulation: {string.Join(' ', _command)} for {name}: exit {code} {stdout}{stderr}");
                        }
                    }
                }
                Thread.Sleep(50);
            }
        }

        // A node re-created for a new device with the same id is a new node.
        private static string Key(string node) => $"{node}@{File.GetLastWriteTimeUtc(node).Ticks}";

        public void Dispose()
        {
            _stop = true;
            _thread.Join(TimeSpan.FromSeconds(35));
        }
    }
}
