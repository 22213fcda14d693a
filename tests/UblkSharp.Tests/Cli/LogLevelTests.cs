using System.Diagnostics;
using UblkSharp.Interop;

namespace UblkSharp.Tests.Cli;

/// <summary>--log-level and UBLKSHARP_LOG_LEVEL on the command line, and the journal's format end to end (no ublk driver needed).</summary>
public class LogLevelTests
{
    [Theory]
    [InlineData("--log-level bogus features", "bad --log-level 'bogus'")]
    [InlineData("features --log-level BOGUS", "bad --log-level 'BOGUS'")]
    [InlineData("cow info --log-level=verbose x.cow", "bad --log-level 'verbose'")]
    public async Task ABadLevelExitsTwoWithOneClearLine(string args, string message)
    {
        var (code, stdout, stderr) = await CliProcess.Cli(args);
        Assert.Equal(2, code);
        Assert.Equal("", stdout);
        var line = Assert.Single(stderr.Trim().Split('\n'));
        Assert.StartsWith($"ublksharp: {message}: use one of trace, debug, information, warning, error, critical, none", line, StringComparison.Ordinal);
    }

    [Fact]
    public async Task ABadVariableIsRefusedTooAndTheOptionWinsOverIt()
    {
        var env = new Dictionary<string, string> { ["UBLKSHARP_LOG_LEVEL"] = "loud" };
        var (code, _, stderr) = await CliProcess.Cli("features", env: env);
        Assert.Equal(2, code);
        Assert.StartsWith("ublksharp: bad UBLKSHARP_LOG_LEVEL 'loud': use one of", stderr, StringComparison.Ordinal);
        (code, _, stderr) = await CliProcess.Cli("features --log-level error", env: env);
        Assert.DoesNotContain("UBLKSHARP_LOG_LEVEL", stderr, StringComparison.Ordinal);
    }

    [Theory]
    [InlineData("features --log-level warning")]
    [InlineData("--log-level=debug features")]
    [InlineData("features --log-level Critical")]
    public async Task EverySubcommandTakesTheOption(string args)
    {
        // Whatever features answers here (no driver: exit 2 and why), the option changes nothing of it.
        var plain = await CliProcess.Cli("features");
        var (code, stdout, stderr) = await CliProcess.Cli(args);
        Assert.Equal(plain.Code, code);
        Assert.Equal(plain.Stdout, stdout);
        Assert.Equal(plain.Stderr, stderr);
        Assert.DoesNotContain("log-level", stderr, StringComparison.Ordinal);
    }

    [Theory]
    [InlineData("", null, true)]
    [InlineData("--log-level warning", null, false)]
    [InlineData("", "warning", false)]
    [InlineData("--log-level information", "error", true)]
    public async Task ServeLogsWhatItsLevelLetsThrough(string option, string? variable, bool informationShown)
    {
        var dir = Directory.CreateTempSubdirectory("ublksharp-log-");
        try
        {
            var socket = Path.Combine(dir.FullName, "s.sock");
            var psi = DaemonStart($"serve -t mem --size 16M --listen unix://{socket} {option}");
            if (variable is not null)
            {
                psi.Environment["UBLKSHARP_LOG_LEVEL"] = variable;
            }
            using var p = Process.Start(psi)!;
            var stderr = p.StandardError.ReadToEndAsync(TestContext.Current.CancellationToken);
            Assert.Equal($"unix://{socket}", await p.StandardOutput.ReadLineAsync(TestContext.Current.CancellationToken));
            Processes.Signal(p.Id, 15);
            Assert.True(p.WaitForExit(20_000), "serve did not stop on SIGTERM");
            Assert.Equal(0, p.ExitCode);
            var text = await stderr;
            Assert.Equal(informationShown, text.Contains("ublksharp: serving mem", StringComparison.Ordinal));
            Assert.Equal(informationShown, text.Contains("ublksharp: stopped; 0 connections", StringComparison.Ordinal));
            if (!informationShown)
            {
                Assert.Equal("", text);
            }
        }
        finally
        {
            dir.Delete(recursive: true);
        }
    }

    /// <summary>
    /// Under systemd, stderr is the journal's stream and JOURNAL_STREAM names it: lines carry the
    /// priority instead of the command's name. A variable naming another file (inherited by a
    /// daemon whose stderr is its log) changes nothing.
    /// </summary>
    [Theory]
    [InlineData(true, "<3>bad listen address '127.0.0.1:10809'")]
    [InlineData(false, "ublksharp: bad listen address '127.0.0.1:10809'")]
    public async Task StderrNamedByJournalStreamGetsPriorityPrefixes(bool matching, string expected)
    {
        var dir = Directory.CreateTempSubdirectory("ublksharp-log-");
        try
        {
            var log = Path.Combine(dir.FullName, "stderr");
            File.WriteAllText(log, "");
            var script = Path.Combine(dir.FullName, "run.sh");
            // The stream's identity as stat(1) gives it (st_dev and st_ino, in decimal), as systemd does.
            File.WriteAllText(script, matching
                ? "JOURNAL_STREAM=$(stat -L -c %d:%i \"$1\") exec dotnet \"$2\" serve -t mem --size 16M --listen 127.0.0.1:10809 2>\"$1\"\n"
                : "JOURNAL_STREAM=$(stat -L -c %d:%i \"$0\") exec dotnet \"$2\" serve -t mem --size 16M --listen 127.0.0.1:10809 2>\"$1\"\n");
            var (code, _, _) = await CliProcess.Run("sh", $"{script} {log} {CliProcess.Dll()}");
            Assert.Equal(1, code);
            var line = Assert.Single(File.ReadAllText(log).Trim().Split('\n'));
            Assert.StartsWith(expected, line, StringComparison.Ordinal);
        }
        finally
        {
            dir.Delete(recursive: true);
        }
    }

    private static ProcessStartInfo DaemonStart(string args)
        => new("dotnet", $"{CliProcess.Dll()} {args}") { RedirectStandardOutput = true, RedirectStandardError = true };
}
