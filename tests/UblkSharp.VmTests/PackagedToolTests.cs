using System.Diagnostics;
using System.Text.RegularExpressions;

namespace UblkSharp.VmTests;

/// <summary>
/// The packages as a user installs them, against the real driver: the `ublksharp` tool that
/// `dotnet tool install --global` put in a clean HOME, and a program built from the UblkSharp
/// package alone serving its own target. ./test.sh makes both on the host
/// (tools/install-packages artifacts/packages) before it boots the guest, which has no network to
/// restore with.
/// </summary>
[Trait("boot", "shared")]
public partial class PackagedToolTests
{
    private const string Image = "/tmp/ublksharp-tool.img";

    private static string Packages
    {
        get
        {
            var dir = Path.Combine(VmEnvironment.RepoRoot, "artifacts", "packages");
            if (!File.Exists(Path.Combine(dir, "version")))
            {
                Assert.Fail($"{dir} is missing: make it on the host first (tools/install-packages artifacts/packages; ./test.sh does)");
            }
            return dir;
        }
    }

    private static string Tool => Path.Combine(Packages, "home", ".dotnet", "tools", "ublksharp");

    private static (int ExitCode, string Output) RunTool(string args)
    {
        var (code, stdout, stderr) = VmEnvironment.Exec(Tool, args.Split(' ', StringSplitOptions.RemoveEmptyEntries), TimeSpan.FromMinutes(3));
        return (code, stdout + stderr);
    }

    [Fact]
    public void TheInstalledToolServesADeviceThroughFioAndDeletesIt()
    {
        VmEnvironment.RequireDriver();
        var clock = Stopwatch.StartNew();
        var (code, features) = RunTool("features");
        VmEnvironment.Figure($"PACKAGED TOOL on {VmEnvironment.KernelRelease}: `ublksharp features` from the installed tool took {clock.Elapsed.TotalSeconds:0.00} s (ReadyToRun, under TCG)");
        Assert.True(code == 0, $"features from the installed tool exited {code}:\n{features}");
        Assert.Matches(@"yes\s+USER_RECOVERY\s", features);

        Lifecycle.CreateImage(Image, 64 << 20);
        uint? id = null;
        try
        {
            (code, var added) = RunTool($"add -t loop -f {Image} -q 2");
            Assert.True(code == 0, $"add from the installed tool exited {code}:\n{added}\n{CliDevices.DaemonLogs()}");
            var dev = BlockPath().Match(added).Value;
            Assert.True(File.Exists(dev), $"add printed no device that exists:\n{added}");
            id = CliDevices.IdOf(dev);
            // The daemon is the installed tool too (it re-runs its own executable, the apphost in the
            // tool's store), not the published CLI.
            var cmdline = File.ReadAllText($"/proc/{CliDevices.DaemonPid(id.Value)}/cmdline").Replace('\0', ' ');
            Assert.True(cmdline.StartsWith(Path.Combine(Packages, "home", ".dotnet", "tools") + "/", StringComparison.Ordinal), $"the daemon runs {cmdline}");
            VmEnvironment.Log($"daemon: {cmdline}");
            Fio.AssertVerified(Fio.Verify(dev, "8M", TimeSpan.FromMinutes(3)));
            (code, var deleted) = RunTool($"del -n {id}");
            Assert.True(code == 0, $"del from the installed tool exited {code}:\n{deleted}");
            Assert.True(VmEnvironment.WaitFor(() => !VmEnvironment.DeviceIds().Contains(id.Value), TimeSpan.FromSeconds(10)), $"device {id} outlived del");
            id = null;
        }
        finally
        {
            if (id is { } left)
            {
                VmEnvironment.RunCli($"del -n {left} --force");
            }
            File.Delete(Image);
        }
    }

    [Fact]
    public async Task AProgramBuiltFromTheLibraryPackageServesItsTargetAsAUblkDevice()
    {
        VmEnvironment.RequireDriver();
        var psi = new ProcessStartInfo("dotnet") { RedirectStandardInput = true, RedirectStandardOutput = true, RedirectStandardError = true };
        psi.ArgumentList.Add(Path.Combine(Packages, "consumer", "PackageConsumer.dll"));
        psi.ArgumentList.Add("ublk");
        using var p = Process.Start(psi)!;
        var stderr = p.StandardError.ReadToEndAsync(TestContext.Current.CancellationToken);
        try
        {
            using var cts = CancellationTokenSource.CreateLinkedTokenSource(TestContext.Current.CancellationToken);
            cts.CancelAfter(TimeSpan.FromMinutes(2)); // a JIT-compiled .NET start under TCG: seconds
            var dev = await p.StandardOutput.ReadLineAsync(cts.Token) ?? "";
            Assert.True(File.Exists(dev), $"the program printed '{dev}', which does not exist");
            // Its RAM disk, written and read back through the kernel, direct IO.
            VmEnvironment.ShOk($"head -c 1M /dev/urandom > /tmp/ublksharp-pattern && dd if=/tmp/ublksharp-pattern of={dev} bs=64k seek=16 oflag=direct status=none");
            var back = VmEnvironment.ShOk($"dd if={dev} bs=64k skip=16 count=16 iflag=direct status=none | cmp - /tmp/ublksharp-pattern && echo same");
            Assert.Contains("same", back, StringComparison.Ordinal);
            Assert.Equal($"{64 << 20}", VmEnvironment.ShOk($"blockdev --getsize64 {dev}").Trim());
        }
        finally
        {
            p.StandardInput.Close(); // it serves until stdin closes, then disposes the device
            if (!p.WaitForExit(TimeSpan.FromSeconds(60))) // a bounded wait in cleanup
            {
                p.Kill(entireProcessTree: true);
                Assert.Fail("the program did not end within 60 s of its stdin closing");
            }
            File.Delete("/tmp/ublksharp-pattern");
        }
        Assert.True(p.ExitCode == 0, $"the program exited {p.ExitCode}: {await stderr}");
        // Its device went with it.
        Assert.True(VmEnvironment.WaitFor(() => VmEnvironment.BlockNodes().Length == 0, TimeSpan.FromSeconds(10)), $"left behind: {string.Join(' ', VmEnvironment.BlockNodes())}");
    }

    [GeneratedRegex(@"/dev/ublkb\d+")]
    private static partial Regex BlockPath();
}
