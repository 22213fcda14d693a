using System.Diagnostics;

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
        Assert.Contains("--start-timeout", options);
        var twice = options.GroupBy(o => o, StringComparer.Ordinal).Where(g => g.Count() > 1).Select(g => g.Key).ToList();
        Assert.True(twice.Count == 0, $"defined more than once: {string.Join(' ', twice)}\n{help}");
    }

    private static async Task<string> Cli(string args)
    {
        string? dll = null;
        for (var d = new DirectoryInfo(AppContext.BaseDirectory); d is not null && dll is null; d = d.Parent)
        {
            if (File.Exists(Path.Combine(d.FullName, "UblkSharp.slnx")))
            {
                dll = Path.Combine(d.FullName, "src", "UblkSharp.Cli", "bin", "Release", "net10.0", "UblkSharp.Cli.dll");
            }
        }
        Assert.True(dll is not null && File.Exists(dll), "UblkSharp.Cli.dll is missing: build the solution in Release first");
        using var p = Process.Start(new ProcessStartInfo("dotnet", $"{dll} {args}") { RedirectStandardOutput = true, RedirectStandardError = true })!;
        var stdout = p.StandardOutput.ReadToEndAsync(TestContext.Current.CancellationToken);
        var stderr = p.StandardError.ReadToEndAsync(TestContext.Current.CancellationToken);
        using var cts = CancellationTokenSource.CreateLinkedTokenSource(TestContext.Current.CancellationToken);
        cts.CancelAfter(TimeSpan.FromSeconds(60));
        await p.WaitForExitAsync(cts.Token);
        Assert.True(p.ExitCode == 0, $"ublksharp {args} exited {p.ExitCode}: {await stderr}");
        return await stdout;
    }
}
