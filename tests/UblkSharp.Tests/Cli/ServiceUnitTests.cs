namespace UblkSharp.Tests.Cli;

/// <summary>
/// The systemd template unit (dist/systemd/ublksharp@.service) as systemd-analyze verify reads it,
/// and `ublksharp run NAME`'s refusals of bad device descriptions, made before the driver is
/// needed. READY/STOPPING and the recovery on restart are VM tests (ServiceTests).
/// </summary>
public class ServiceUnitTests
{
    [Fact]
    public async Task TheUnitVerifiesCleanAndRunsTheServiceCommand()
    {
        var root = CliProcess.RepoRoot();
        var unit = File.ReadAllText(Path.Combine(root, "dist", "systemd", "ublksharp@.service"));
        var lines = unit.Split('\n').Select(l => l.Trim()).ToList();
        Assert.Contains("Type=notify", lines);
        Assert.Contains("Restart=on-failure", lines);
        Assert.Contains("ExecStart=/usr/bin/ublksharp run %i", lines);
        // verify checks that ExecStart is executable: point it at this build's CLI.
        var cli = Path.Combine(root, "src", "UblkSharp.Cli", "bin", "Release", "net10.0", "UblkSharp.Cli");
        Assert.True(File.Exists(cli), $"{cli} is missing: build the solution in Release first");
        var dir = Directory.CreateTempSubdirectory("ublksharp-unit-");
        try
        {
            var copy = unit.Replace("/usr/bin/ublksharp", cli, StringComparison.Ordinal).Replace("ConditionPathExists=/etc/ublksharp/%i.json", "", StringComparison.Ordinal);
            File.WriteAllText(Path.Combine(dir.FullName, "ublksharp@.service"), copy);
            File.CreateSymbolicLink(Path.Combine(dir.FullName, "ublksharp@disk1.service"), "ublksharp@.service");
            var (code, stdout, stderr) = await CliProcess.Run("systemd-analyze", "verify ./ublksharp@disk1.service", dir.FullName);
            // verify exits 0 on unknown keys and bad values too, with a line each: there must be none.
            Assert.True(code == 0 && stdout.Trim().Length == 0 && stderr.Trim().Length == 0, $"systemd-analyze verify exited {code}:\n{stdout}{stderr}");
        }
        finally
        {
            dir.Delete(recursive: true);
        }
    }

    [Theory]
    [InlineData("{ \"target\": \"null\" }", "'id' (a number) is required")]
    [InlineData("{ \"id\": 3 }", "'target' is required")]
    [InlineData("{ \"id\": 4294967295, \"target\": \"null\" }", "'id' is a device number from 0 to 1048575")]
    [InlineData("{ \"id\": -1, \"target\": \"null\" }", "not -1")]
    [InlineData("{ \"id\": 3, \"target\": \"null\", \"size\": \"1G\" }", "unknown member 'size'")]
    [InlineData("{ \"id\": 3, \"target\": \"null\", \"recovery\": \"sometimes\" }", "bad recovery mode 'sometimes'")]
    [InlineData("{ \"id\": 3, \"target\": \"null\", \"options\": [1] }", "'options' is an object")]
    [InlineData("{ \"id\": 3, \"target\": \"loop\", \"options\": { \"file\": \"/nonexistent/disk.img\" } }", "/nonexistent/disk.img")]
    [InlineData("{ \"id\": 3, \"target\": \"floppy\" }", "floppy")]
    [InlineData("not json", "disk.json")]
    [InlineData("{ \"id\": 3, \"target\": \"null\", \"metrics\": \"tcp://0.0.0.0:9560\" }", "beyond this machine")]
    public async Task ABadDescriptionIsRefusedWithTheFileAndTheReason(string json, string expected)
    {
        var dir = Directory.CreateTempSubdirectory("ublksharp-run-");
        try
        {
            File.WriteAllText(Path.Combine(dir.FullName, "disk.json"), json);
            var (code, _, stderr) = await CliProcess.Cli("run disk", dir.FullName, new() { ["UBLKSHARP_CONFIG_DIR"] = dir.FullName });
            Assert.NotEqual(0, code);
            Assert.Contains(expected, stderr, StringComparison.Ordinal);
            Assert.DoesNotContain("   at ", stderr, StringComparison.Ordinal);
            // Checked before the driver: the refusal is about the file, not about a missing ublk_drv.
            Assert.DoesNotContain("ublk_drv", stderr, StringComparison.Ordinal);
        }
        finally
        {
            dir.Delete(recursive: true);
        }
    }

    [Fact]
    public async Task AMissingDescriptionSaysWhereItWasLookedFor()
    {
        var dir = Directory.CreateTempSubdirectory("ublksharp-run-");
        try
        {
            var (code, _, stderr) = await CliProcess.Cli("run nosuch", dir.FullName, new() { ["UBLKSHARP_CONFIG_DIR"] = dir.FullName });
            Assert.NotEqual(0, code);
            Assert.Contains(Path.Combine(dir.FullName, "nosuch.json"), stderr, StringComparison.Ordinal);
            (code, _, stderr) = await CliProcess.Cli("run ../escape", dir.FullName, new() { ["UBLKSHARP_CONFIG_DIR"] = dir.FullName });
            Assert.NotEqual(0, code);
            Assert.DoesNotContain("   at ", stderr, StringComparison.Ordinal);
        }
        finally
        {
            dir.Delete(recursive: true);
        }
    }
}
