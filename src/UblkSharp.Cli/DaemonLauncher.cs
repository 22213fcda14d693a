using System.Diagnostics;
using UblkSharp.Interop;
using UblkSharp.Runtime;

namespace UblkSharp.Cli;

/// <summary>
/// Starts `ublksharp add ... --foreground` as a detached daemon (its own session, output to a log
/// under /run/ublksharp/logs) and waits until it reports the device live or fails.
/// .NET cannot fork, so the daemon is a fresh process; the report travels through a file.
/// </summary>
internal static class DaemonLauncher
{
    private static readonly TimeSpan ReadyTimeout = TimeSpan.FromMinutes(3);

    public static (uint Id, string Path) Launch(string[] args)
    {
        var runDir = DeviceRecord.Directory;
        var logDir = Path.Combine(runDir, "logs");
        Directory.CreateDirectory(logDir);
        var token = $"{DateTime.UtcNow:yyyyMMdd-HHmmss}-{Guid.NewGuid().ToString("N")[..8]}";
        var ready = Path.Combine(runDir, $"ready-{token}");
        var log = Path.Combine(logDir, $"daemon-{token}.log");

        var psi = new ProcessStartInfo("/bin/sh") { RedirectStandardOutput = true, UseShellExecute = false };
        // setsid: the daemon must outlive this command and its terminal; no stdio is shared with the
        // caller, so `$(ublksharp add ...)` returns as soon as this process does.
        psi.ArgumentList.Add("-c");
        psi.ArgumentList.Add("exec setsid \"$@\" </dev/null >>\"$UBLKSHARP_LOG\" 2>&1 & echo $!");
        psi.ArgumentList.Add("sh");
        psi.ArgumentList.Add(Environment.ProcessPath ?? "dotnet");
        if (Path.GetFileNameWithoutExtension(Environment.ProcessPath) == "dotnet")
        {
            psi.ArgumentList.Add(typeof(DaemonLauncher).Assembly.Location);
        }
        foreach (var a in args)
        {
            psi.ArgumentList.Add(a);
        }
        psi.ArgumentList.Add("--foreground");
        psi.ArgumentList.Add("--ready-file");
        psi.ArgumentList.Add(ready);
        psi.Environment["UBLKSHARP_LOG"] = log;

        int pid;
        using (var sh = Process.Start(psi) ?? throw new IOException("could not start /bin/sh"))
        {
            var line = sh.StandardOutput.ReadLine();
            sh.WaitForExit();
            if (!int.TryParse(line, out pid))
            {
                throw new IOException("could not start the daemon");
            }
        }

        var deadline = Stopwatch.StartNew();
        while (true)
        {
            if (File.Exists(ready))
            {
                var report = File.ReadAllText(ready).Trim();
                File.Delete(ready);
                var parts = report.Split(' ', 3);
                if (parts[0] == "ok" && parts.Length == 3 && uint.TryParse(parts[1], out var id))
                {
                    return (id, parts[2]);
                }
                throw new DaemonFailedException(report.StartsWith("error ", StringComparison.Ordinal) ? report[6..] : report);
            }
            if (!Processes.IsAlive(pid))
            {
                throw new DaemonFailedException($"the daemon exited before the device was live; its log ({log}) ends:\n{Tail(log)}");
            }
            if (deadline.Elapsed > ReadyTimeout)
            {
                Processes.Signal(pid, Processes.SIGKILL);
                throw new DaemonFailedException($"the device was not live within {ReadyTimeout.TotalSeconds} s; the daemon was killed. Log: {log}");
            }
            Thread.Sleep(20);
        }
    }

    public static void ReportReady(string? readyFile, uint id, string path) => Write(readyFile, $"ok {id} {path}");

    public static void ReportFailure(string? readyFile, string message) => Write(readyFile, $"error {message}");

    private static void Write(string? readyFile, string text)
    {
        if (readyFile is null)
        {
            return;
        }
        var tmp = readyFile + ".tmp";
        File.WriteAllText(tmp, text);
        File.Move(tmp, readyFile, overwrite: true);
    }

    private static string Tail(string log)
    {
        try
        {
            return string.Join('\n', File.ReadLines(log).TakeLast(10));
        }
        catch (IOException)
        {
            return "(no log)";
        }
    }
}

/// <summary>The daemon reported a failure (already phrased for the user).</summary>
internal sealed class DaemonFailedException(string message) : Exception(message);
