using System.CommandLine;
using System.Diagnostics;
using UblkSharp.Cli.Logging;
using UblkSharp.Interop;
using UblkSharp.Runtime;
using UblkSharp.Ublk;

namespace UblkSharp.Cli.Commands;

/// <summary>
/// `ublksharp setup-unprivileged`: lets every user add ublk devices of their own
/// (UNPRIVILEGED_DEV, Linux 6.3+). It installs the udev rule ublksrv documents: /dev/ublk-control
/// open to all (the kernel then only lets a user add devices marked as theirs, and command the ones
/// whose /dev/ublkcN they may open), and each new device's nodes handed to the user who added it by
/// `ublksharp udev-chown`, which the rule runs.
/// </summary>
internal static class SetupUnprivilegedCommand
{
    public const string DefaultRulesFile = "/etc/udev/rules.d/70-ublksharp.rules";

    public static Command Create()
    {
        var rulesFile = new Option<string>("--rules-file") { Description = "Where to write the udev rule", DefaultValueFactory = _ => DefaultRulesFile };
        var print = new Option<bool>("--print") { Description = "Print the rule instead of installing it" };
        var command = new Command("setup-unprivileged", "Let users add and serve ublk devices of their own (installs a udev rule; run as root)") { rulesFile, print };
        command.SetAction(r =>
        {
            var rule = Rule();
            if (r.GetValue(print))
            {
                Console.Write(rule);
                return 0;
            }
            if (!OperatingSystem.IsLinux())
            {
                throw new PlatformNotSupportedException("ublk is Linux's");
            }
            if (!Processes.IsRoot)
            {
                throw new UnauthorizedAccessException("setup-unprivileged writes a udev rule and changes /dev/ublk-control: run it as root (or use --print)");
            }
            var path = Path.GetFullPath(r.GetValue(rulesFile)!);
            var dir = Path.GetDirectoryName(path)!;
            if (!Directory.Exists(dir))
            {
                throw new ArgumentException($"{dir} does not exist (is udev installed? --rules-file chooses another place)");
            }
            var temp = path + ".tmp";
            File.WriteAllText(temp, rule);
            File.SetUnixFileMode(temp, UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.GroupRead | UnixFileMode.OtherRead);
            File.Move(temp, path, overwrite: true);
            Console.WriteLine($"wrote {path}");
            // What the rule would have done had it been there already: now, without waiting for udev.
            if (File.Exists(ControlDevice.Path))
            {
                File.SetUnixFileMode(ControlDevice.Path, UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.GroupRead | UnixFileMode.GroupWrite | UnixFileMode.OtherRead | UnixFileMode.OtherWrite);
                Console.WriteLine($"{ControlDevice.Path} is open to users now");
            }
            else
            {
                CliLog.Warning($"warning: {ControlDevice.Path} does not exist yet ('modprobe ublk_drv'); the rule opens it when the driver loads");
            }
            Reload();
            return 0;
        });
        return command;
    }

    /// <summary>`ublksharp udev-chown NODE`: what the rule runs for each new ublkcN or ublkbN (hidden from help).</summary>
    public static Command CreateChown()
    {
        var node = new Argument<string>("node") { Description = "ublkcN or ublkbN, as udev's %k gives it" };
        var command = new Command("udev-chown", "Give a user's new device nodes to that user (run by the udev rule of setup-unprivileged)") { node };
        command.Hidden = true;
        command.SetAction(r =>
        {
            var name = r.GetValue(node)!;
            DeviceOwnership.IdOf(name); // bad input first
            using var control = ControlDevice.Open();
            DeviceOwnership.HandOver(control, name);
            return 0;
        });
        return command;
    }

    /// <summary>The rule, naming this very executable for its helper.</summary>
    public static string Rule()
    {
        var self = DaemonLauncher.SelfStartInfo(["udev-chown", "%k"]);
        var run = string.Join(' ', new[] { self.FileName }.Concat(self.ArgumentList).Select(a => a.Contains(' ', StringComparison.Ordinal) ? $"'{a}'" : a));
        return $"""
            # Written by 'ublksharp setup-unprivileged': lets users add ublk devices of their own (UBLK_F_UNPRIVILEGED_DEV).
            # The kernel lets a user command only the devices whose /dev/ublkcN they may open; the
            # helper gives a new device's nodes to the user the kernel recorded as its owner.
            KERNEL=="ublk-control", MODE="0666", OPTIONS+="static_node=ublk-control"
            ACTION=="add", KERNEL=="ublk[bc][0-9]*", RUN+="{run}"

            """;
    }

    private static void Reload()
    {
        try
        {
            using var p = Process.Start(new ProcessStartInfo("udevadm", ["control", "--reload"]) { UseShellExecute = false, RedirectStandardError = true });
            if (p is not null && p.WaitForExit(10_000) && p.ExitCode == 0)
            {
                Console.WriteLine("udev rules reloaded");
                return;
            }
            CliLog.Warning("warning: 'udevadm control --reload' failed: the rule applies once udev reloads its rules");
        }
        catch (System.ComponentModel.Win32Exception)
        {
            CliLog.Warning("warning: no udevadm here: the rule applies once udev (re)starts");
        }
    }
}
