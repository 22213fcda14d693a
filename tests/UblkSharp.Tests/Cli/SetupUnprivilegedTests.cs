using UblkSharp.Runtime;

namespace UblkSharp.Tests.Cli;

/// <summary>`setup-unprivileged` and the rule's helper `udev-chown` on the command line (the VM's UnprivilegedTests run them against the driver).</summary>
public class SetupUnprivilegedTests
{
    [Fact]
    public async Task PrintShowsTheRuleWithThisExecutableAsItsHelper()
    {
        var (code, stdout, stderr) = await CliProcess.Cli("setup-unprivileged --print");
        Assert.True(code == 0, stderr);
        Assert.Contains("KERNEL==\"ublk-control\", MODE=\"0666\"", stdout, StringComparison.Ordinal);
        // Run by dotnet here: the helper is dotnet with this very dll.
        Assert.Matches($"ACTION==\"add\", KERNEL==\"ublk\\[bc\\]\\[0-9\\]\\*\", RUN\\+=\"\\S*dotnet {System.Text.RegularExpressions.Regex.Escape(CliProcess.Dll())} udev-chown %k\"", stdout);
    }

    [Fact]
    public async Task InstallWritesTheRuleReadableByAllAndSaysWhatItCouldNotDoHere()
    {
        var dir = Directory.CreateTempSubdirectory("ublksharp-rules-");
        var rules = Path.Combine(dir.FullName, "70-ublksharp.rules");
        var (code, stdout, stderr) = await CliProcess.Cli($"setup-unprivileged --rules-file {rules}");
        Assert.True(code == 0, stderr);
        Assert.Contains($"wrote {rules}", stdout, StringComparison.Ordinal);
        Assert.Contains("udev-chown %k", await File.ReadAllTextAsync(rules, TestContext.Current.CancellationToken), StringComparison.Ordinal);
        if (OperatingSystem.IsLinux())
            Assert.Equal(UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.GroupRead | UnixFileMode.OtherRead, File.GetUnixFileMode(rules));
        // This host has no ublk driver: said, not failed.
        Assert.Contains("/dev/ublk-control does not exist yet", stderr, StringComparison.Ordinal);
        dir.Delete(recursive: true);
    }

    [Theory]
    [InlineData("setup-unprivileged --rules-file /nonexistent-dir/70-ublksharp.rules", "/nonexistent-dir does not exist")]
    [InlineData("udev-chown sda", "'sda' is not a ublk device node name")]
    [InlineData("udev-chown ublkc", "'ublkc' is not a ublk device node name")]
    [InlineData("udev-chown ublkbx1", "'ublkbx1' is not a ublk device node name")]
    public async Task BadInputIsOneClearLine(string args, string message)
    {
        var (code, stdout, stderr) = await CliProcess.Cli(args);
        Assert.NotEqual(0, code);
        Assert.Equal("", stdout);
        var line = Assert.Single(stderr.Trim().Split('\n'));
        Assert.Contains(message, line, StringComparison.Ordinal);
    }

    [Theory]
    [InlineData("ublkc0", 0u)]
    [InlineData("ublkb17", 17u)]
    [InlineData("ublkc4095", 4095u)]
    public void NodeNamesGiveTheirDeviceId(string name, uint id) => Assert.Equal(id, DeviceOwnership.IdOf(name));
}
