using System.Diagnostics;

namespace UblkSharp.Tests.Cli;

/// <summary>Runs the built CLI (or another program) as a process, bounded in time, for the tests of the command line.</summary>
internal static class CliProcess
{
    public static string RepoRoot()
    {
        for (var d = new DirectoryInfo(AppContext.BaseDirectory); d is not null; d = d.Parent)
        {
            if (File.Exists(Path.Combine(d.FullName, "UblkSharp.slnx")))
            {
                return d.FullName;
            }
        }
        throw new InvalidOperationException("UblkSharp.slnx not found above " + AppContext.BaseDirectory);
    }

    /// <summary>The Release build's UblkSharp.Cli.dll (the solution must be built first).</summary>
    public static string Dll()
    {
        var dll = Path.Combine(RepoRoot(), "src", "UblkSharp.Cli", "bin", "Release", "net10.0", "UblkSharp.Cli.dll");
        Assert.True(File.Exists(dll), "UblkSharp.Cli.dll is missing: build the solution in Release first");
        return dll;
    }

    /// <summary>`ublksharp ARGS` through dotnet: its exit code, stdout and stderr.</summary>
    public static Task<(int Code, string Stdout, string Stderr)> Cli(string args, string? cwd = null, Dictionary<string, string>? env = null) =>
        Run("dotnet", $"{Dll()} {args}", cwd, env);

    public static async Task<(int Code, string Stdout, string Stderr)> Run(string file, string args, string? cwd = null, Dictionary<string, string>? env = null)
    {
        var psi = new ProcessStartInfo(file, args) { RedirectStandardOutput = true, RedirectStandardError = true };
        if (cwd is not null)
        {
            psi.WorkingDirectory = cwd;
        }
        foreach (var (k, v) in env ?? [])
        {
            psi.Environment[k] = v;
        }
        using var p = Process.Start(psi)!;
        var stdout = p.StandardOutput.ReadToEndAsync(TestContext.Current.CancellationToken);
        var stderr = p.StandardError.ReadToEndAsync(TestContext.Current.CancellationToken);
        using var cts = CancellationTokenSource.CreateLinkedTokenSource(TestContext.Current.CancellationToken);
        cts.CancelAfter(TimeSpan.FromSeconds(60));
        await p.WaitForExitAsync(cts.Token);
        return (p.ExitCode, await stdout, await stderr);
    }
}
