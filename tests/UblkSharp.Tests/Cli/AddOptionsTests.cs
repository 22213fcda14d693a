namespace UblkSharp.Tests.Cli;

/// <summary>The options of `ublksharp add`, as its help lists them (no ublk driver needed).</summary>
public class AddOptionsTests
{
    [Fact]
    public async Task EveryOptionIsDefinedOnce()
    {
        var help = await Cli("add --help");
        var options = help.Split('\n')
            .Select(l => l.TrimStart())
            .Where(l => l.StartsWith('-'))
            .SelectMany(l => l.Split(' ', 2)[0].Split(','))
            .Select(o => o.Trim())
            .Where(o => o.StartsWith("--", StringComparison.Ordinal))
            .ToList();
        Assert.Contains("--create", options);
        // The usage line names the command as users type it, not the assembly (UblkSharp.Cli).
        Assert.Contains("ublksharp add [options]", help, StringComparison.Ordinal);
        Assert.Contains("--start-timeout", options);
        var twice = options.GroupBy(o => o, StringComparer.Ordinal).Where(g => g.Count() > 1).Select(g => g.Key).ToList();
        Assert.True(twice.Count == 0, $"defined more than once: {string.Join(' ', twice)}\n{help}");
    }

    [Fact]
    public async Task ASupervisedCowDeviceIsRefusedBeforeAnythingStarts()
    {
        var dir = Directory.CreateTempSubdirectory("ublksharp-add-");
        try
        {
            var basePath = Path.Combine(dir.FullName, "base.img");
            File.WriteAllBytes(basePath, new byte[1 << 20]);
            var overlay = Path.Combine(dir.FullName, "over.cow");
            global::UblkSharp.Targets.Cow.CowTarget.CreateOverlay(overlay, basePath);
            var (code, _, stderr) = await Run($"add -t cow -f {overlay} --recovery reissue --supervise");
            Assert.NotEqual(0, code);
            Assert.Contains("--supervise recovers the device after its daemon crashes", stderr, StringComparison.Ordinal);
            // With --create: refused before the COW file is made.
            var fresh = Path.Combine(dir.FullName, "fresh.cow");
            (code, _, stderr) = await Run($"add -t cow -f {fresh} --create --backing {basePath} --recovery reissue --supervise");
            Assert.False(File.Exists(fresh), "a refused add made its COW file");
            Assert.NotEqual(0, code);
            Assert.Contains("--supervise recovers the device after its daemon crashes", stderr, StringComparison.Ordinal);
            Assert.Contains("upgrade", stderr, StringComparison.Ordinal);
            Assert.DoesNotContain("   at ", stderr, StringComparison.Ordinal); // no stack trace
        }
        finally
        {
            dir.Delete(recursive: true);
        }
    }

    [Theory]
    [InlineData("tcp://0.0.0.0:9560", "beyond this machine")]
    [InlineData("tcp://192.0.2.1:9560", "--metrics-insecure")]
    [InlineData("tcp://127.0.0.1", "give the port")]
    [InlineData("http://127.0.0.1:9560", "bad --metrics address")]
    public async Task AMetricsAddressBeyondLoopbackOrWithoutAPortIsRefused(string address, string expected)
    {
        var (code, _, stderr) = await Run($"add -t null --size 1M --metrics {address}");
        Assert.NotEqual(0, code);
        Assert.Contains(expected, stderr, StringComparison.Ordinal);
        Assert.DoesNotContain("   at ", stderr, StringComparison.Ordinal);
    }

    private static async Task<string> Cli(string args)
    {
        var (code, stdout, stderr) = await Run(args);
        Assert.True(code == 0, $"ublksharp {args} exited {code}: {stderr}");
        return stdout;
    }

    private static Task<(int Code, string Stdout, string Stderr)> Run(string args) => CliProcess.Cli(args);
}
