using Microsoft.Extensions.Logging;
using UblkSharp.Cli.Logging;
using UblkSharp.Runtime;

namespace UblkSharp.Tests.Cli;

/// <summary>The CLI's stderr logger: its plain and journal formats, the JOURNAL_STREAM check, and level filtering.</summary>
public class StderrLoggerTests
{
    [Theory]
    [InlineData(LogLevel.Critical, 2)]
    [InlineData(LogLevel.Error, 3)]
    [InlineData(LogLevel.Warning, 4)]
    [InlineData(LogLevel.Information, 6)]
    [InlineData(LogLevel.Debug, 7)]
    [InlineData(LogLevel.Trace, 7)]
    public void TheJournalGetsTheSdDaemonPriorityOfEachLevel(LogLevel level, int priority)
    {
        var (logger, output) = Logger(LogLevel.Trace, journal: true);
        Say(logger, level, "device 3 stopped");
        Assert.Equal($"<{priority}>device 3 stopped\n", output.ToString());
    }

    [Fact]
    public void WithoutTheJournalALineStartsWithTheCommandsName()
    {
        var (logger, output) = Logger(LogLevel.Information, journal: false);
        Say(logger, LogLevel.Warning, "device 3: no metrics");
        Assert.Equal("ublksharp: device 3: no metrics\n", output.ToString());
    }

    [Fact]
    public void EveryLineOfAStackTraceIsItsOwnJournalEntryAtThePriority()
    {
        var (logger, output) = Logger(LogLevel.Information, journal: true);
        Say(logger, LogLevel.Critical, "a queue thread failed", Thrown());
        var lines = output.ToString().TrimEnd('\n').Split('\n');
        Assert.True(lines.Length >= 2, output.ToString());
        Assert.StartsWith("<2>a queue thread failed: System.InvalidOperationException: boom", lines[0], StringComparison.Ordinal);
        Assert.All(lines, l => Assert.StartsWith("<2>", l, StringComparison.Ordinal));
        Assert.Contains(lines, l => l.StartsWith("<2>   at ", StringComparison.Ordinal));
    }

    [Fact]
    public void AWarningsExceptionIsOneLineUnlessDebugging()
    {
        var (logger, output) = Logger(LogLevel.Information, journal: false);
        Say(logger, LogLevel.Warning, "queue 0: target failed to close its backend", Thrown());
        Assert.Equal("ublksharp: queue 0: target failed to close its backend: InvalidOperationException: boom\n", output.ToString());

        (logger, output) = Logger(LogLevel.Debug, journal: false);
        Say(logger, LogLevel.Warning, "queue 0: target failed to close its backend", Thrown());
        Assert.Contains("\n   at ", output.ToString(), StringComparison.Ordinal);
    }

    [Theory]
    [InlineData(LogLevel.Trace, new[] { "t", "d", "i", "w", "e", "c" })]
    [InlineData(LogLevel.Information, new[] { "i", "w", "e", "c" })]
    [InlineData(LogLevel.Warning, new[] { "w", "e", "c" })]
    [InlineData(LogLevel.Critical, new[] { "c" })]
    [InlineData(LogLevel.None, new string[0])]
    public void MessagesBelowTheMinimumLevelAreDropped(LogLevel minimum, string[] expected)
    {
        var (logger, output) = Logger(minimum, journal: false);
        string[] names = ["t", "d", "i", "w", "e", "c"];
        for (var level = LogLevel.Trace; level <= LogLevel.Critical; level++)
        {
            Assert.Equal(expected.Contains(names[(int)level]), logger.IsEnabled(level));
            Say(logger, level, names[(int)level]);
        }
        Say(logger, LogLevel.None, "never");
        var written = output.ToString().Split('\n', StringSplitOptions.RemoveEmptyEntries).Select(l => l["ublksharp: ".Length..]);
        Assert.Equal(expected, written);
    }

    [Fact]
    public void JournalStreamMustNameStderrItself()
    {
        var stderr = new FileIdentity(2049, 123456);
        Assert.True(JournalFormat.Names("2049:123456", stderr));
        // The variable is inherited by a daemon whose stderr is its log file: another inode, or device.
        Assert.False(JournalFormat.Names("2049:123457", stderr));
        Assert.False(JournalFormat.Names("2048:123456", stderr));
        Assert.False(JournalFormat.Names(null, stderr));
        Assert.False(JournalFormat.Names("", stderr));
        Assert.False(JournalFormat.Names("2049:123456", null));
        Assert.False(JournalFormat.Names("2049", stderr));
        Assert.False(JournalFormat.Names(":123456", stderr));
        Assert.False(JournalFormat.Names("2049:-1", stderr));
        Assert.False(JournalFormat.Names("2049:123456:7", stderr));
    }

    [Fact]
    public void AnOpenDescriptorHasTheIdentityStatGivesItsFile()
    {
        using var file = new TempFile(4096);
        var byPath = FileIdentity.Of(file.Path);
        Assert.NotNull(byPath);
        Assert.Equal(byPath, FileIdentity.OfDescriptor(file.Fd));
        Assert.Null(FileIdentity.OfDescriptor(-1));
    }

    private static (ILogger Logger, StringWriter Output) Logger(LogLevel minimum, bool journal)
    {
        var output = new StringWriter { NewLine = "\n" };
        var provider = new StderrLoggerProvider(minimum, journal, output);
        return (provider.CreateLogger("test"), output);
    }

    // ILogger.Log itself, as the generated methods call it.
    private static void Say(ILogger logger, LogLevel level, string message, Exception? exception = null)
        => logger.Log(level, default, message, exception, static (m, _) => m);

    private static InvalidOperationException Thrown()
    {
        try
        {
            throw new InvalidOperationException("boom");
        }
        catch (InvalidOperationException e)
        {
            return e;
        }
    }
}
