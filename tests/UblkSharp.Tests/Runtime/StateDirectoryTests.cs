using UblkSharp.Runtime;

namespace UblkSharp.Tests.Runtime;

/// <summary>The state directory (UBLKSHARP_RUN_DIR) is used only if nobody but its owner can write it.</summary>
[System.Runtime.Versioning.SupportedOSPlatform("linux")]
public class StateDirectoryTests : IDisposable
{
    private readonly DirectoryInfo _dir = Directory.CreateTempSubdirectory("ublksharp-state-");

    public void Dispose()
    {
        _dir.Delete(recursive: true);
        GC.SuppressFinalize(this);
    }

    [Theory]
    [InlineData(UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.UserExecute)]
    [InlineData(UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.UserExecute | UnixFileMode.GroupRead | UnixFileMode.GroupExecute
        | UnixFileMode.OtherRead | UnixFileMode.OtherExecute)]
    public void AnOwnDirectoryThatOnlyItsOwnerWritesIsUsed(UnixFileMode mode)
    {
        File.SetUnixFileMode(_dir.FullName, mode);
        StateDirectory.Verify(_dir.FullName);
        StateDirectory.Verify(Path.Combine(_dir.FullName, "missing")); // created later, by Ensure
    }

    [Theory]
    [InlineData(UnixFileMode.GroupWrite)]
    [InlineData(UnixFileMode.OtherWrite)]
    public void ADirectoryOthersMayWriteIsRefused(UnixFileMode extra)
    {
        File.SetUnixFileMode(_dir.FullName, UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.UserExecute | extra);
        var e = Assert.Throws<UnsafeStateDirectoryException>(() => StateDirectory.Verify(_dir.FullName));
        Assert.Contains($"refusing the state directory {_dir.FullName}: group or others may write to it", e.Message, StringComparison.Ordinal);
        Assert.Throws<UnsafeStateDirectoryException>(() => StateDirectory.Ensure(Path.Combine(_dir.FullName, "..", _dir.Name)));
    }

    [Fact]
    public void ADirectoryOfAnotherUserIsRefused()
    {
        Assert.SkipUnless(UblkSharp.Interop.Processes.IsRoot, "giving a directory to another user needs root");
        var theirs = Path.Combine(_dir.FullName, "theirs");
        Directory.CreateDirectory(theirs);
        var chown = System.Diagnostics.Process.Start("chown", ["65534", theirs])!;
        Assert.True(chown.WaitForExit(30_000) && chown.ExitCode == 0, "chown failed");
        var e = Assert.Throws<UnsafeStateDirectoryException>(() => StateDirectory.Verify(theirs));
        Assert.Contains("belongs to uid 65534, not to root", e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void AFileIsNotADirectory()
    {
        var file = Path.Combine(_dir.FullName, "file");
        File.WriteAllText(file, "");
        Assert.Throws<UnsafeStateDirectoryException>(() => StateDirectory.Verify(file));
    }

    [Fact]
    public void EnsureMakesADirectoryForItsOwnerOnlyAndFilesAreForTheirOwnerOnly()
    {
        var dir = Path.Combine(_dir.FullName, "run");
        StateDirectory.Ensure(dir);
        Assert.Equal(UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.UserExecute, File.GetUnixFileMode(dir));
        var record = Path.Combine(dir, "0.json");
        File.WriteAllText(record + $".tmp{Environment.ProcessId}", "a leftover, readable by all");
        File.SetUnixFileMode(record + $".tmp{Environment.ProcessId}", (UnixFileMode)0x1b6); // 0666
        StateDirectory.WriteAtomically(record, "{}");
        Assert.Equal("{}", File.ReadAllText(record));
        Assert.Equal(UnixFileMode.UserRead | UnixFileMode.UserWrite, File.GetUnixFileMode(record));
        var log = Path.Combine(dir, "daemon.log");
        StateDirectory.CreateFile(log);
        Assert.Equal(UnixFileMode.UserRead | UnixFileMode.UserWrite, File.GetUnixFileMode(log));
    }
}
